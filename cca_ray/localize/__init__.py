"""Error localisation: pivotal tokens where a greedy and a contrasting trace part ways."""

from cca_ray.localize.branching import branching
from cca_ray.localize.pivots import (
    METHODS,
    Localization,
    LocalizationError,
    Pivot,
    pivot_kinds,
    prefix_method,
    split_pivots,
)


def localize(method: str, traces, sampler=None, tokenizer=None, max_new_tokens: int | None = None,
             chunk: int = 8, progress: bool = True) -> Localization:
    """Dispatch on the configured method; branching variants need a sampler for completions."""
    if method == "prefix":
        return prefix_method(traces, tokenizer or sampler.tokenizer)
    if method not in METHODS:
        raise ValueError(f"unknown localisation method {method!r}; choose one of {METHODS}")
    if sampler is None:
        raise ValueError(f"localisation method {method!r} completes prefixes: it needs a sampler")
    return branching(sampler, traces, method, max_new_tokens, chunk, progress)


__all__ = ["METHODS", "Localization", "LocalizationError", "Pivot", "branching", "localize",
           "pivot_kinds", "prefix_method", "split_pivots"]
