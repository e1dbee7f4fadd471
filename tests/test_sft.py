"""The fine-tuning baselines (issue 6's full FT and LoRA): prompt tokens masked, the cosine
schedule's formula, training lowers the loss, the best step's weights reproduce the scored model,
and the model is handed back with its base weights."""

from __future__ import annotations

import copy

import pytest
import torch

from cca_ray.data.prompts import build_prompt
from cca_ray.data.templates import instantiate_templates, load_templates
from cca_ray.sampling.base import encode_prompts
from cca_ray.tiny import TEMPLATES_DIR
from cca_ray.update.sft import IGNORE, LORA_TARGETS, collate, cosine_lr, finetune, sft_examples


@pytest.fixture(scope="module")
def setup(small_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_model)
    model = AutoModelForCausalLM.from_pretrained(small_model).eval()
    problems, _ = instantiate_templates(load_templates(TEMPLATES_DIR)[:3], 6, seed=1, progress=False)
    examples = sft_examples(problems, lambda q: build_prompt(q, 0), tok)
    return model, tok, problems, examples


def _loss(model, examples, pad_id) -> float:
    with torch.no_grad():
        return model(**collate(examples, pad_id, torch.device("cpu"))).loss.item()


def test_prompt_tokens_are_masked(setup):
    _, tok, problems, examples = setup
    prompt = encode_prompts(tok, [build_prompt(problems[0].question, 0)])[0]
    e = examples[0]
    assert e.ids[: len(prompt)] == prompt
    assert e.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert e.labels[len(prompt):] == e.ids[len(prompt):] and e.ids[-1] == tok.eos_token_id
    assert "The final answer is" in tok.decode(e.ids[len(prompt):])


def test_cosine_schedule_formula():
    assert cosine_lr(0, 100, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10) == pytest.approx(0.5)  # halfway through the decay
    assert cosine_lr(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_lowers_the_loss_and_restores_the_base(setup, method):
    model, tok, _, examples = setup
    base = copy.deepcopy(model.state_dict())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seen = []

    def validate(weights):
        value = -_loss(model, examples, pad)  # higher is better, like an accuracy
        seen.append(value)
        return value

    res = finetune(model, examples, pad, validate, lora=method == "lora", lr=3e-3, steps=12, batch_size=4,
                   eval_every=4, progress=False)
    assert res.best_step > 0 and res.best_val > seen[0]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())  # base handed back
    assert not any(p.requires_grad for p in model.parameters())
    # the best step's weights, loaded into a copy of the base, are the model that was scored
    scored = copy.deepcopy(model)
    scored.load_state_dict(res.best, strict=False)
    assert -_loss(scored, examples, pad) == pytest.approx(res.best_val, abs=1e-4)
    total = sum(p.numel() for p in model.parameters())
    if method == "lora":
        linears = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LORA_TARGETS]
        assert res.trainable_parameters == sum(16 * (m.in_features + m.out_features) for m in linears)
        assert all(n.split(".")[-2].endswith("_proj") for n in res.best)
    else:
        assert res.trainable_parameters == total and res.changed_parameters > total / 2


def test_no_mask_update_raises_the_logit_difference_on_every_parameter(setup):
    from cca_ray.dcm.batches import Example, full_logits, logit_difference
    from cca_ray.update.nomask import all_parameter_update

    model, tok, _, sft = setup
    base = copy.deepcopy(model.state_dict())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # pivot-like examples: a prefix, the reference next token (desired) against another one
    examples = [Example(e.ids[:k], e.ids[k], (e.ids[k] + 7) % len(tok)) for e in sft[:8]
                for k in (len(e.ids) - 3,)]

    def diff() -> float:
        with torch.no_grad():
            return logit_difference(full_logits(model, examples, pad), examples).mean().item()

    res = all_parameter_update(model, examples, pad, lambda w: diff(), lr=0.05, steps=6, progress=False)
    assert res.best_step > 0 and res.best_val > res.history[0]["val_accuracy"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())  # base handed back
    total = sum(p.numel() for p in model.parameters())
    assert res.trainable_parameters == total
    assert res.changed_parameters > total / 2  # "no mask": nearly every entry moves
    scored = copy.deepcopy(model)
    scored.load_state_dict(res.best, strict=False)
    with torch.no_grad():
        again = logit_difference(full_logits(scored, examples, pad), examples).mean().item()
    assert again == pytest.approx(res.best_val, abs=1e-4)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_full_finetune_under_deepspeed_zero_matches_plain(setup, zero_stage):
    """The TrainerActor's path: AdamW + cosine + clipping inside a DeepSpeed ZeRO engine (gloo, world
    size 1) gives the plain PyTorch run's validations and best weights, and leaves no DeepSpeed state."""
    from cca_ray.update.deepspeed import deepspeed_env, init_distributed

    deepspeed_env()
    init_distributed()
    model, tok, _, examples = setup
    base = copy.deepcopy(model.state_dict())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    linear = torch.nn.functional.linear
    runs = {}
    for stage in (None, zero_stage):
        runs[stage] = finetune(model, examples, pad, lambda w: -_loss(model, examples, pad), lora=False,
                               lr=3e-3, steps=8, batch_size=4, eval_every=4, zero_stage=stage, progress=False)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())  # base handed back
        assert not any(hasattr(p, "ds_id") or p.requires_grad for p in model.parameters())
    plain, zero = runs[None], runs[zero_stage]
    assert torch.nn.functional.linear is linear  # ZeRO-3 did not leave its F.linear swap behind
    assert [h["step"] for h in zero.history] == [h["step"] for h in plain.history]
    # float32 AdamW in two implementations of the same arithmetic (DeepSpeed clips on its flat buffer)
    for a, b in zip(plain.history, zero.history, strict=True):
        if a.get("loss") is not None:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    assert zero.best_step == plain.best_step and set(zero.best) == set(plain.best)
    worst = max((zero.best[n] - w).abs().max().item() for n, w in plain.best.items())
    assert worst < 1e-4, worst
    assert zero.changed_parameters > sum(p.numel() for p in model.parameters()) / 2
