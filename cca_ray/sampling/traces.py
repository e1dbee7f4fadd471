"""Traces for localisation: one greedy trace per training problem and the first of n sampled
traces whose correctness differs from it (the contrasting trace), or none."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cca_ray.data.answers import is_correct
from cca_ray.data.gsm_symbolic import Problem


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
    """Prompt ids as the model sees them (special tokens such as Gemma's BOS included)."""
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]


def collect_traces(sampler, problems: list[Problem], prompts: list[str], n_samples: int,
                   temperature: float, seed: int, max_new_tokens: int | None = None) -> list[Trace]:
    """Greedy trace + n seeded samples per problem; keep the first sample that disagrees in
    correctness with greedy (samples are drawn together, which gives the same first one)."""
    ids = prompt_token_ids(sampler.tokenizer, prompts)
    greedy = sampler.generate_ids(ids, desc="greedy traces", max_new_tokens=max_new_tokens)
    samples = sampler.generate_ids(ids, n=n_samples, temperature=temperature, seed=seed,
                                   desc=f"{n_samples} samples per problem", max_new_tokens=max_new_tokens)
    traces = []
    for p, prompt, pids, g, s in zip(problems, prompts, ids, greedy, samples, strict=True):
        g_ok = is_correct(g[0].text, p.gold)
        t = Trace(p.id, p.instance, p.gold, prompt, pids, g[0].token_ids, g[0].text, g_ok)
        for i, c in enumerate(s):
            c_ok = is_correct(c.text, p.gold)
            if c_ok != g_ok:
                t.contrast_ids, t.contrast_text, t.contrast_correct, t.contrast_sample = (
                    c.token_ids, c.text, c_ok, i)
                break
        traces.append(t)
    return traces
