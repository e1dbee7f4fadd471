"""Pivotal tokens: the record a localisation method produces, and the prefix method (the first
token where the greedy and the contrasting trace part)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass, field

from cca_ray.errors import UserError
from cca_ray.sampling.traces import Trace

METHODS = ("prefix", "branching", "branching-batched", "branching-bisect")


class LocalizationError(UserError, RuntimeError):
    """Localisation cannot give a usable set (no contrasting traces, too few examples)."""


@dataclass
class Pivot:
    """One localisation example: the model should prefer desired over undesired after prefix."""

    template_id: int | str
    instance_id: int
    method: str
    prefix: dict  # {"text": str, "token_ids": list[int]}; its last token is the intervention token
    desired_token: int
    undesired_token: int
    position: int  # index of the pivotal token in the generated trace
    greedy_correct: bool

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> Pivot:
        return cls(**row)


@dataclass
class Localization:
    pivots: list[Pivot]
    method: str
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    generated_tokens: int = 0  # completion tokens the method spent (0 for prefix)
    completions: int = 0

    def summary(self) -> dict:
        return {"method": self.method, "examples": len(self.pivots), "dropped": dict(self.dropped),
                "dropped_total": sum(self.dropped.values()), "generated_tokens": self.generated_tokens,
                "completions": self.completions}


def make_pivot(trace: Trace, method: str, position: int, shared: list[int], flipped_token: int,
               other_token: int, flipped_correct: bool, tokenizer) -> Pivot:
    """A pivot whose prefix is prompt + shared trace tokens; flipped_token leads to an answer of
    correctness flipped_correct, other_token to the opposite."""
    ids = trace.prompt_ids + shared
    desired, undesired = (flipped_token, other_token) if flipped_correct else (other_token, flipped_token)
    return Pivot(trace.template_id, trace.instance_id, method,
                 {"text": trace.prompt + tokenizer.decode(shared), "token_ids": ids},
                 desired, undesired, position, trace.greedy_correct)


def usable(traces: list[Trace], dropped: Counter) -> list[Trace]:
    """Traces with a contrasting sample; the others are counted as dropped."""
    out = []
    for t in traces:
        if t.contrast_ids is None:
            dropped["no contrasting sample"] += 1
        elif not t.contrast_ids:
            dropped["empty contrasting trace"] += 1
        else:
            out.append(t)
    return out


def prefix_method(traces: list[Trace], tokenizer) -> Localization:
    """First differing token between greedy and contrasting trace; desired = the correct
    trace's token there, undesired = the incorrect one's."""
    loc = Localization([], "prefix")
    for t in usable(traces, loc.dropped):
        g, c = t.greedy_ids, t.contrast_ids
        i = next((k for k, (a, b) in enumerate(zip(g, c, strict=False)) if a != b), None)
        if i is None:
            loc.dropped["one trace is a prefix of the other"] += 1
            continue
        loc.pivots.append(make_pivot(t, "prefix", i, g[:i], c[i], g[i], bool(t.contrast_correct),
                                     tokenizer))
    return loc


def split_pivots(pivots: list[Pivot], fraction: float, seed: int) -> tuple[list[Pivot], list[Pivot]]:
    """(train, held-out): a seeded share ``fraction`` of the pivots held out of DCM and the updates
    (at least one, and at least one left to train, when fraction > 0); both keep the input order."""
    n = len(pivots)
    k = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n >= 2 else 0
    held = set(random.Random(seed).sample(range(n), k))
    return [p for i, p in enumerate(pivots) if i not in held], [p for i, p in enumerate(pivots) if i in held]


OPERATION_TOKENS = frozenset("+-*/×÷")


def pivot_kind(p: Pivot, tokenizer) -> str:
    """"operation" (both sides an operation sign), "arithmetic" (digit against digit) or "other"."""
    sides = [tokenizer.decode([t]).replace("▁", "").strip() for t in (p.desired_token, p.undesired_token)]
    if all(s and s in OPERATION_TOKENS for s in sides):
        return "operation"
    return "arithmetic" if all(s.isdigit() for s in sides) else "other"


def pivot_kinds(pivots: list[Pivot], tokenizer) -> dict[str, int]:
    """How many pivots are of each kind (pivot_kind): it tells a world whose errors are choices
    from one whose errors are sums."""
    counts = Counter({"operation": 0, "arithmetic": 0, "other": 0})
    counts.update(pivot_kind(p, tokenizer) for p in pivots)
    return dict(counts)
