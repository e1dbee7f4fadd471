"""The four binary next-token tasks of Gao et al. (2025) as minimal pairs drawn from the corpus's own
idioms, and the task loss (two-way cross-entropy between the correct and the alternative token).

Rows 2i and 2i+1 of a batch differ in one opening construct only; row 2i's answer is the task's
token A (label +1), row 2i+1's is token B (label -1).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from cca_ray.circuits import corpus
from cca_ray.circuits.tokenizer import EOT, single_token

TASKS = ("single_double_quote", "bracket_counting", "set_or_string", "while_return_true")

# task -> (token A, token B): the two candidate next tokens, A answered by a pair's first row
CANDIDATES = {
    "single_double_quote": ('"', "'"),
    "bracket_counting": ("]]", "]"),
    "set_or_string": (".", " +="),
    "while_return_true": (":", "\n"),
}


@dataclass
class TaskBatch:
    """Minimal pairs of one task: contexts right-padded with EOT, the scored position, the answers."""

    tokens: torch.Tensor  # long [N, T]
    last: torch.Tensor  # long [N]: position whose next-token prediction is scored
    correct: torch.Tensor  # long [N]
    alternative: torch.Tensor  # long [N]
    label: torch.Tensor  # float [N]: +1 where correct == token_a, -1 where correct == token_b
    token_a: int
    token_b: int
    name: str

    def __len__(self) -> int:
        return self.tokens.shape[0]


def _prefix(rng: random.Random, distractors: bool = True) -> str:
    """0-2 unrelated corpus statements before a quote / bracket decision (same for both rows);
    without ``distractors`` only integer statements, so no closed string or list precedes it."""
    make = corpus.simple_statement if distractors else corpus.int_statement
    return "".join(make(rng) + "\n" for _ in range(rng.choice((0, 0, 1, 1, 2))))


def _quote_pair(rng: random.Random, distractors: bool = True) -> tuple[str, str]:
    """`name = "words` vs `name = 'words` (or print(...)): the answer is the opening quote."""
    pre, state = _prefix(rng, distractors), rng.getstate()
    out = []
    for q in corpus.QUOTES:
        rng.setstate(state)  # the same statement with the other quote
        stmt = corpus.string_statement(rng, q)
        out.append(pre + stmt[:stmt.rindex(q)])
    return out[0], out[1]


def _bracket_pair(rng: random.Random, distractors: bool = True) -> tuple[str, str]:
    """`name = [[1, 2` vs `name = [1, 2` (or print / for): the answer closes the opened depth."""
    pre = _prefix(rng, distractors)
    maker = rng.choice((corpus.list_statement, corpus.list_statement, corpus.for_list_block))
    state = rng.getstate()
    out = []
    for depth in (2, 1):
        rng.setstate(state)  # the same statement at the other depth
        text = maker(rng, depth)
        out.append(pre + text[:text.index("]")])
    return out[0], out[1]


def _accumulator_pair(rng: random.Random, distractors: bool = True) -> tuple[str, str]:
    """`x = set()` ... `x` vs `x = ""` ... `x`: the answer is `.` (of `.add(`) or ` +=`."""
    p = corpus.draw_accumulator(rng)
    out = []
    for kind in ("set", "string"):
        text = corpus.render_accumulator(p, kind, rng)
        m = re.search(rf"\n *{re.escape(p.name)}(?=\.add\(| \+=)", text)
        out.append(text[:m.end()])
    return out[0], out[1]


def _bool_pair(rng: random.Random, distractors: bool = True) -> tuple[str, str]:
    """`while True` vs `return True` inside a small function: the answer is `:` or a newline."""
    p = corpus.draw_bool_func(rng)
    out = []
    for kind in ("while", "return"):
        text = corpus.render_bool_func(p, kind)
        out.append(text[:text.index(" True") + len(" True")])
    return out[0], out[1]


_PAIRS: dict[str, Callable[[random.Random, bool], tuple[str, str]]] = {
    "single_double_quote": _quote_pair,
    "bracket_counting": _bracket_pair,
    "set_or_string": _accumulator_pair,
    "while_return_true": _bool_pair,
}


def make_task(name: str, tok: Tokenizer, n_pairs: int, seed: int, max_len: int = 64,
              distractors: bool = True) -> TaskBatch:
    """`n_pairs` minimal pairs of task `name` (deterministic given seed), each context at most
    `max_len` tokens including its leading EOT. ``distractors``: unrelated statements before a quote
    or bracket decision may hold closed strings and lists (the harder variant); without, none do."""
    if name not in _PAIRS:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    a, b = (single_token(tok, t) for t in CANDIDATES[name])
    eot = tok.token_to_id(EOT)
    rng = random.Random(f"{name}/{seed}")
    rows: list[list[int]] = []
    tries = 0
    while len(rows) < 2 * n_pairs:
        tries += 1
        if tries > 100 * n_pairs + 1000:
            raise ValueError(f"task {name}: could not draw {n_pairs} pairs of contexts of at most "
                             f"{max_len} tokens")
        pair = [[eot] + tok.encode(text, add_special_tokens=False).ids
                for text in _PAIRS[name](rng, distractors)]
        if max(map(len, pair)) <= max_len:
            rows += pair
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), eot, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
    correct = torch.tensor([a, b] * n_pairs, dtype=torch.long)
    return TaskBatch(tokens=tokens, last=torch.tensor([len(r) - 1 for r in rows], dtype=torch.long),
                     correct=correct, alternative=a + b - correct,
                     label=torch.tensor([1.0, -1.0] * n_pairs), token_a=a, token_b=b, name=name)


def binary_logit(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """logit(A) - logit(B) per row, from next-token logits [N, V] at the scored positions."""
    return logits[:, batch.token_a] - logits[:, batch.token_b]


def task_loss(logits: torch.Tensor, batch: TaskBatch, scale: float | torch.Tensor = 1.0,
              shift: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Mean softplus(-label x (scale x binary_logit + shift)): with scale 1, shift 0 the two-way
    cross-entropy -log softmax([l_correct, l_alternative])[0] (the paper's task loss)."""
    return F.softplus(-batch.label.to(logits.dtype) * (scale * binary_logit(logits, batch) + shift)).mean()


def task_accuracy(logits: torch.Tensor, batch: TaskBatch) -> float:
    """Fraction of rows whose binary logit points to the correct token."""
    return float((batch.label.to(logits.device) * binary_logit(logits, batch) > 0).float().mean())
