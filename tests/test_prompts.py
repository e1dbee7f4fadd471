"""The 8-shot chain-of-thought prompt, with exemplars read from the installed lm-eval."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from cca_ray.data.answers import extract_answer
from cca_ray.data.prompts import (
    COT_PREFIX,
    INSTRUCTION,
    build_prompt,
    gsm8k_cot_exemplars,
    solution_to_cot,
)


def test_exemplars_come_from_the_lm_eval_package():
    path = resources.files("lm_eval").joinpath("tasks", "gsm8k", "gsm8k-cot.yaml")
    samples = yaml.safe_load(path.read_text())["fewshot_config"]["samples"]
    shots = gsm8k_cot_exemplars()
    assert len(shots) == 8
    assert [q for q, _ in shots] == [" ".join(s["question"].split()) for s in samples[:8]]
    assert shots[0][1].endswith("So there must have been 21 - 15 = 6. The final answer is 6.")
    assert all(a.endswith(".") and "The final answer is" in a for _, a in shots)


def test_plain_prompt_layout():
    prompt = build_prompt("Tom has 3 apples. How many?")
    assert prompt.startswith(INSTRUCTION + "\n\nQ: There are 15 trees in the grove.")
    assert prompt.endswith("\n\nQ: Tom has 3 apples. How many?\nA: Let's think step by step.")
    assert prompt.count("\nA: " + COT_PREFIX) == 9
    assert build_prompt("Q?", n_shots=0) == f"{INSTRUCTION}\n\nQ: Q?\nA: {COT_PREFIX}"
    assert build_prompt("Q?", n_shots=3).count("The final answer is") == 3
    for bad in (-1, 9):
        with pytest.raises(ValueError, match="n_shots"):
            build_prompt("Q?", n_shots=bad)


def test_every_exemplar_extracts_its_own_answer():
    for _, answer in gsm8k_cot_exemplars():
        assert extract_answer(answer) == float(answer.rsplit(" ", 1)[1].rstrip("."))


def test_chat_template_mode():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prompt = build_prompt("Q?", n_shots=2, chat_template=True, tokenizer=tok)
    assert prompt.count("<|user|>") == 3 and prompt.count("<|assistant|>") == 3
    assert prompt.startswith(f"<|user|>{INSTRUCTION}\n\nQ: There are 15 trees")
    assert prompt.endswith(f"<|user|>Q: Q?\n<|assistant|>A: {COT_PREFIX}")
    with pytest.raises(ValueError, match="chat template"):
        build_prompt("Q?", chat_template=True, tokenizer=None)


def test_solution_to_cot():
    answer = "He has 3 * 4 = <<3*4=12>>12 eggs.\nThen 12 + 1 = <<12+1=13>>13.\n#### 13"
    cot = solution_to_cot(answer)
    assert cot == "He has 3 * 4 = 12 eggs. Then 12 + 1 = 13. The final answer is 13."
    assert extract_answer(cot) == 13.0
