"""Traces for localisation: one greedy trace per training problem and the first of n sampled
traces whose correctness differs from it (the contrasting trace), or none."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cca_ray.data.answers import is_correct
from cca_ray.data.gsm_symbolic import Problem
from cca_ray.sampling.base import encode_prompts


@dataclass
class Trace:
    template_id: int | str
    instance_id: int
    gold: float
    prompt: str
    prompt_ids: list[int]
    greedy_ids: list[int]
    greedy_text: str
    greedy_correct: bool
    contrast_ids: list[int] | None = None
    contrast_text: str | None = None
    contrast_correct: bool | None = None
    contrast_sample: int | None = None  # index among the n samples of the one kept

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> Trace:
        return cls(**row)


def prompt_token_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt ids as the model sees them: the same encoding the samplers use."""
    return encode_prompts(tokenizer, prompts)


def round_sizes(n: int) -> list[int]:
    """Samples drawn per round: 1, 1, 2, 2, 4, 4, ... summing to n."""
    sizes, k = [], 0
    while sum(sizes) < n:
        sizes.append(min(1 << (k // 2), n - sum(sizes)))
        k += 1
    return sizes


def collect_traces(sampler, problems: list[Problem], prompts: list[str], n_samples: int,
                   temperature: float, seed: int, max_new_tokens: int | None = None) -> list[Trace]:
    """Greedy trace + up to n seeded samples per problem; the first sample that disagrees in
    correctness with greedy is kept. Samples come in rounds (1, 1, 2, 2, 4, ...) and a problem
    leaves once it has its contrast, so easy cases do not pay for all n samples."""
    ids = prompt_token_ids(sampler.tokenizer, prompts)
    greedy = sampler.generate_ids(ids, desc="greedy traces", max_new_tokens=max_new_tokens)
    traces = []
    for p, prompt, pids, g in zip(problems, prompts, ids, greedy, strict=True):
        traces.append(Trace(p.id, p.instance, p.gold, prompt, pids, g[0].token_ids, g[0].text,
                            is_correct(g[0].text, p.gold)))
    pending, drawn = list(range(len(problems))), 0
    for r, k in enumerate(round_sizes(n_samples)):
        if not pending:
            break
        desc = f"samples {drawn + 1}-{drawn + k} of {n_samples} ({len(pending)} problems)"
        outs = sampler.generate_ids([ids[i] for i in pending], n=k, temperature=temperature,
                                    seed=seed * 1_000 + r, max_new_tokens=max_new_tokens, desc=desc)
        still = []
        for i, samples in zip(pending, outs, strict=True):
            t = traces[i]
            for j, c in enumerate(samples):
                c_ok = is_correct(c.text, problems[i].gold)
                if c_ok != t.greedy_correct:
                    t.contrast_ids, t.contrast_text, t.contrast_correct, t.contrast_sample = (
                        c.token_ids, c.text, c_ok, drawn + j)
                    break
            else:
                still.append(i)
        pending, drawn = still, drawn + k
    return traces
