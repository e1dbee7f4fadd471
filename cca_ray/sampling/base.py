"""What every sampling backend shares: the Completion record, the stop rule and the one place that
turns generated token ids into a cut Completion, so HF and vLLM cut identically."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from cca_ray.data.answers import STOP_SENTENCE

# The stop string vLLM is given (the answer-sentence rule is a regex, so it is applied afterwards).
STOP_STRINGS = ["\nQ:"]
# Prompt tokens decoded in front of the generated ones, so a tokenizer that drops the leading space
# of a sequence (SentencePiece) still yields the generated text exactly as it follows the prompt.
CONTEXT_TOKENS = 4


@dataclass
class Completion:
    """One generated continuation, cut at the stop point.

    ``token_ids`` is the shortest prefix of the generated ids (EOS/pad excluded) whose decoding
    reaches the stop point, so ``decode(token_ids)`` starts with ``text``."""

    text: str
    token_ids: list[int]


def cut_at_stop(text: str) -> tuple[str, bool]:
    """The text up to the stop point, and whether a stop point was found."""
    match = STOP_SENTENCE.search(text)
    q = text.find("\nQ:")
    ends = [e for e in (match.end() if match else -1, q) if e >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


@runtime_checkable
class Sampler(Protocol):
    """A trace generator: n completions per prompt, greedy at temperature 0, cut at the stop rule.

    ``prefix_texts`` (one per prompt) is text already generated before the prompt's end: the stop
    rule sees ``prefix_texts[i] + generated`` while the Completion holds only the generated part."""

    tokenizer: Any

    def generate(self, prompts: list[str], n: int = 1, temperature: float = 0.0, seed: int = 0,
                 desc: str = "generating", max_new_tokens: int | None = None) -> list[list[Completion]]:
        ...

    def generate_ids(self, prompt_ids: list[list[int]], n: int = 1, temperature: float = 0.0,
                     seed: int = 0, desc: str = "generating", max_new_tokens: int | None = None,
                     prefix_texts: list[str] | None = None) -> list[list[Completion]]:
        ...

    def close(self) -> None:
        ...


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids as every backend and every stage sees them: the tokenizer's own special
    tokens (Gemma's BOS; the tiny tokenizer adds none), except for a text that already starts with
    the BOS token (a chat template writes it), which would otherwise get two."""
    bos = getattr(tokenizer, "bos_token", None)
    return [tokenizer(p, add_special_tokens=not (bos and p.startswith(bos)))["input_ids"] for p in prompts]


def eos_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """Every id that ends generation: the tokenizer's EOS plus the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return ids


def check_request(prompt_count: int, n: int, temperature: float,
                  prefix_texts: Sequence[str] | None) -> list[str]:
    """Validate the shared arguments; the prefixes, '' for each prompt when none are given."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and n != 1:
        raise ValueError("greedy decoding gives one completion per prompt (n=1)")
    if prefix_texts is None:
        return [""] * prompt_count
    if len(prefix_texts) != prompt_count:
        raise ValueError(f"{len(prefix_texts)} prefix_texts for {prompt_count} prompts")
    return list(prefix_texts)


def decode_continuation(tokenizer: Any, ids: Sequence[int], context: Sequence[int] = ()) -> str:
    """The text of ``ids`` as it reads after ``context`` (the prompt's last tokens)."""
    if context:
        head = tokenizer.decode(list(context), skip_special_tokens=True)
        full = tokenizer.decode(list(context) + list(ids), skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head):]
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def strip_eos(ids: Iterable[int], stop_ids: set[int]) -> list[int]:
    """The generated ids before the first EOS/pad id."""
    out = []
    for t in ids:
        if t in stop_ids:
            break
        out.append(t)
    return out


def make_completion(tokenizer: Any, ids: Sequence[int], prefix_text: str = "",
                    context: Sequence[int] = ()) -> Completion:
    """Cut generated ids (EOS/pad already removed) at the stop rule applied to prefix + text.

    The ids kept are the shortest prefix whose decoding reaches the stop point."""
    ids = list(ids)
    full = decode_continuation(tokenizer, ids, context)
    cut, found = cut_at_stop(prefix_text + full)
    if not found:
        return Completion(text=full, token_ids=ids)
    text = full[: max(0, len(cut) - len(prefix_text))]
    if not text:
        return Completion(text="", token_ids=[])

    def reaches(k: int) -> bool:
        return len(decode_continuation(tokenizer, ids[:k], context)) >= len(text)

    lo, hi = 1, len(ids)  # decoded length grows with k, so bisect for the first k that reaches
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid + 1, hi)
    for k in range(lo, len(ids) + 1):  # a tokenizer whose prefixes decode oddly: walk on
        if decode_continuation(tokenizer, ids[:k], context).startswith(text):
            return Completion(text=text, token_ids=ids[:k])
    return Completion(text=text, token_ids=ids)


def sample_seed(seed: int, index: int) -> int:
    """A per-prompt seed derived from the call's seed, so duplicate prompts still get different
    samples and seeds s and s+1 share no random stream."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1
