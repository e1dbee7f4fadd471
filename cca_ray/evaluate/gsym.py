"""GSym accuracy: greedy completions scored against the gold answer, macro-averaged over
templates, with the per-template table."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from cca_ray.data.answers import is_correct, macro_accuracy, per_template_accuracy
from cca_ray.data.gsm_symbolic import Problem


def greedy_correct(sampler, problems: list[Problem], prompt: Callable[[str], str],
                   desc: str = "greedy eval", max_new_tokens: int | None = None) -> dict[tuple, bool]:
    """(template id, instance) -> whether the greedy completion's final answer is right."""
    outs = sampler.generate([prompt(p.question) for p in problems], desc=desc,
                            max_new_tokens=max_new_tokens)
    return {p.key: is_correct(o[0].text, p.gold) for p, o in zip(problems, outs, strict=True)}


def accuracy_report(problems: list[Problem], correct: Mapping[tuple, bool]) -> dict:
    """Macro accuracy over templates, the per-template table and the problem count."""
    pairs = [(p.id, correct[p.key]) for p in problems]
    return {"accuracy": macro_accuracy(pairs), "problems": len(pairs),
            "per_template": {str(k): v for k, v in per_template_accuracy(pairs).items()}}
