"""The 8-shot chain-of-thought prompt of the method doc.

The exemplars are the standard GSM8K chain-of-thought ones, read from the installed lm-eval
package's ``gsm8k-cot.yaml`` (not retyped); their closing "The answer is N." becomes the
paper's "The final answer is N.".
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

import yaml

INSTRUCTION = "As an expert problem solver, solve step by step the following mathematical questions."
COT_PREFIX = "Let's think step by step."
MAX_SHOTS = 8
_LMEVAL_FILE = ("tasks", "gsm8k", "gsm8k-cot.yaml")
_ANSWER_TAIL = re.compile(r"The answer is (.+?)\.?\s*$", re.DOTALL)


class _TolerantLoader(yaml.SafeLoader):
    """SafeLoader that reads lm-eval's custom tags (!function ...) as plain strings."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: str(node.value))


@functools.lru_cache(maxsize=1)
def gsm8k_cot_exemplars() -> tuple[tuple[str, str], ...]:
    """(question, worked answer ending 'The final answer is N.') for the 8 standard shots."""
    try:
        root = resources.files("lm_eval")
    except ModuleNotFoundError as exc:
        raise RuntimeError("the prompt's exemplars come from lm-eval: pip install 'lm-eval[hf]'") from exc
    path = root.joinpath(*_LMEVAL_FILE)
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)
    samples = config["fewshot_config"]["samples"]
    shots = []
    for s in samples:
        target = " ".join(s["target"].split())
        match = _ANSWER_TAIL.search(target)
        if not match:
            raise RuntimeError(f"{path}: exemplar target does not end 'The answer is N.': {target!r}")
        body = target[: match.start()].rstrip()
        shots.append((" ".join(s["question"].split()), f"{body} The final answer is {match.group(1)}."))
    if len(shots) < MAX_SHOTS:
        raise RuntimeError(f"{path}: expected {MAX_SHOTS} exemplars, found {len(shots)}")
    return tuple(shots[:MAX_SHOTS])


def build_prompt(question: str, n_shots: int = MAX_SHOTS, chat_template: bool = False,
                 tokenizer: Any = None) -> str:
    """The prompt for one question; plain text by default, or through the tokenizer's chat
    template (shots as alternating user/assistant turns) when ``chat_template`` is set."""
    if not 0 <= n_shots <= MAX_SHOTS:
        raise ValueError(f"n_shots must be in 0..{MAX_SHOTS}, got {n_shots}")
    shots = gsm8k_cot_exemplars()[:n_shots] if n_shots else ()  # zero-shot needs no lm-eval
    if not chat_template:
        blocks = [INSTRUCTION]
        blocks += [f"Q: {q}\nA: {COT_PREFIX} {a}" for q, a in shots]
        blocks.append(f"Q: {question.strip()}\nA: {COT_PREFIX}")
        return "\n\n".join(blocks)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True needs a tokenizer that has a chat template")
    messages: list[dict[str, str]] = []
    for i, (q, a) in enumerate(shots):
        messages.append({"role": "user", "content": (INSTRUCTION + "\n\n" if i == 0 else "") + f"Q: {q}"})
        messages.append({"role": "assistant", "content": f"A: {COT_PREFIX} {a}"})
    first = INSTRUCTION + "\n\n" if not shots else ""
    messages.append({"role": "user", "content": f"{first}Q: {question.strip()}"})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{text}A: {COT_PREFIX}"


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def solution_to_cot(answer: str) -> str:
    """A GSM8K-style solution as the prompt's answer style: calculator marks and the '####'
    line removed, lines joined, ending 'The final answer is N.' (used for SFT targets)."""
    body, _, final = answer.rpartition("####")
    if not _:
        raise ValueError("solution has no '#### N' line")
    text = " ".join(line.strip() for line in _CALCULATOR.sub("", body).splitlines() if line.strip())
    return f"{text} The final answer is {final.strip()}."
