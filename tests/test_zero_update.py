"""The DeepSpeed ZeRO targeted update on the small built-in model, against the plain row-delta update:
the same rows for ZeRO stages 0-3 (SGD) and for Adam, nothing outside the selected rows moves, the
validated weights are exactly what merge_rows exports, and the shared in-memory model is a plain base
model again after every call (also after an error), ready for the next one."""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cca_ray.components import KINDS, component_space
from cca_ray.dcm import Example
from cca_ray.sampling.weights import Rows, materialise
from cca_ray.update import RowDeltas, UpdateError, merge_rows, selected_rows, targeted_update
from cca_ray.update.deepspeed import deepspeed_env, init_distributed, zero_targeted_update

LINEAR = torch.nn.functional.linear  # ZeRO-3 may swap this process-wide; it must not
STEPS, MICRO = 6, 3  # 8 examples -> micro-batches of 3, 3, 2; validation at steps 0, 2, 4, 6
VALS = [0.1, 0.3, 0.5, 0.4]  # scripted validation accuracies: the best step is 4
# max |zero - plain| over the updated rows, measured on this CPU (torch 2.13, DeepSpeed 0.19.8): SGD
# 1.9e-8 (stages 0-2) and 4.5e-8 (stage 3) for deltas up to 7e-2; Adam 9.1e-8 (ZeRO-2) and 3.9e-7
# (ZeRO-3) for deltas up to 6e-3. Not bit-equal: the plain update computes W x + D x and the delta's
# gradient from the selected output columns only, the ZeRO one (W + D) x and the full weight gradient.
# Adam magnifies that rounding a hundredfold in the odd entry whose gradient is near its eps (1e-8;
# the smallest here is 6.6e-9): other rows gave one entry of 9728 off by 2e-6 under ZeRO-3, the rest
# within 4e-8. So Adam's max is bounded by lr / 100 and its 99.9th percentile by 1e-7.
TOL_SGD, TOL_ADAM, TOL_ADAM_BULK = 1e-6, 1e-5, 1e-7
TEXTS = ["Ana has 5 apples. She buys 3 more apples.", "A box holds 6 pencils.",
         "The first box has 4 oranges.", "Tom reads 7 pages a day for 2 days.",
         "Sam has 9 cards and gives 2 away.", "A bus has 12 seats and 5 are empty.", "Mia bakes 8 cakes.",
         "There are 3 cats and 4 dogs in the yard. How many pets are there?"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)  # compares NaN and -0.0 bit for bit too


def _hooks(model) -> int:
    return sum(len(getattr(m, h)) for m in model.modules()
               for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _recording(values: list[float], seen: list[dict[str, torch.Tensor]], check=None):
    """validate(): records the weights it gets (and runs ``check``) and returns the scripted values."""
    it = iter(values)

    def validate(weights: dict[str, torch.Tensor]) -> float:
        seen.append(weights)
        if check is not None:
            check()
        return next(it)

    return validate


@pytest.fixture(scope="module", autouse=True)
def ds_env():
    added = deepspeed_env()
    init_distributed()
    init_distributed()  # a second call is a no-op
    yield
    for key in added:  # the process group stays up for the session; later modules need no env
        os.environ.pop(key, None)


@pytest.fixture(scope="module")
def small(small_model):
    tok = AutoTokenizer.from_pretrained(small_model)
    model = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32).eval()
    digit = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    examples = [Example(tok(t).input_ids, digit[i % 10], digit[(i + 3) % 10]) for i, t in enumerate(TEXTS)]
    assert len({len(e.ids) for e in examples}) > 3  # varied lengths: padding and sorting matter
    space = component_space(model)
    gen = torch.Generator().manual_seed(0)
    sel = {k: torch.rand(space.shape(k), generator=gen) < 0.3 for k in KINDS}
    for s in sel.values():
        s[0, 0] = True  # every kind, layer 0 included
    rows = selected_rows(model, space, sel)
    ids = torch.tensor([examples[-1].ids])
    with torch.no_grad():
        logits = model(ids).logits
    return SimpleNamespace(model=model, pad=tok.pad_token_id, examples=examples, rows=rows, ids=ids,
                           logits=logits, base={n: p.detach().clone() for n, p in model.named_parameters()})


def _scripted(values: list[float]):
    it = iter(values)
    return lambda weights: next(it)


def _plain(small, optimizer: str, lr: float):
    model = copy.deepcopy(small.model)
    seen: list[dict[str, torch.Tensor]] = []
    result = targeted_update(model, RowDeltas(model, small.rows), small.examples, small.pad,
                             _recording(VALS, seen), lr=lr, steps=STEPS, optimizer=optimizer,
                             micro_batch_size=MICRO, progress=False)
    return result, seen


@pytest.fixture(scope="module")
def plain_sgd(small):
    return _plain(small, "sgd", 1.0)


@pytest.fixture(scope="module")
def plain_adam(small):
    return _plain(small, "adam", 1e-3)


def _assert_plain_base(small) -> None:
    """The shared model is the base model again, bit for bit, frozen, hook-free and usable."""
    model = small.model
    for name, p in model.named_parameters():
        assert torch.equal(_bits(p), _bits(small.base[name])), name
        assert not p.requires_grad and p.grad is None, name
        assert not hasattr(p, "ds_id") and not hasattr(p, "ds_tensor"), name
    assert _hooks(model) == 0 and not model.training
    assert torch.nn.functional.linear is LINEAR
    with torch.no_grad():
        assert torch.equal(model(small.ids).logits, small.logits)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _check_against_plain(small, plain, result, seen: list[dict[str, torch.Tensor]], tol: float) -> float:
    """Same bookkeeping and rows as the plain update; returns the measured max abs difference."""
    want, want_seen = plain
    params = dict(small.model.named_parameters())
    assert (result.best_step, result.best_val) == (want.best_step, want.best_val) == (4, 0.5)
    assert [h["step"] for h in result.history] == list(range(STEPS + 1))
    assert [h.get("val_accuracy") for h in result.history] == [h.get("val_accuracy") for h in want.history]
    assert result.history[0]["loss"] is None
    for got, exp in zip(result.history[1:], want.history[1:], strict=True):
        assert got["loss"] == pytest.approx(exp["loss"], abs=1e-6)
    assert result.trainable_parameters == want.trainable_parameters
    shapes = [(len(r), params[n].shape[1]) for n, r in small.rows.items()]
    assert [tuple(d.shape) for d in result.best] == shapes
    assert max(d.abs().max().item() for d in want.best) > 1e-3  # the rows really moved
    diff = _max_diff(result.best, want.best)
    assert diff <= tol
    assert (result.best_updated_step, result.best_updated_val) == (want.best_updated_step,
                                                                   want.best_updated_val) == (4, 0.5)
    assert _max_diff(result.best_updated, want.best_updated) <= tol
    # validate() got every trained parameter's selected rows (what a weight sync sends), at every
    # validation step, as the plain one did; as whole weights they differ from the base only there
    assert len(seen) == len(want_seen) == len(VALS)
    for step, (got, exp) in enumerate(zip(seen, want_seen, strict=True)):
        assert list(got) == list(small.rows)
        for name, rows in small.rows.items():
            assert isinstance(got[name], Rows) and torch.equal(got[name].index, rows.cpu())
            base = small.base[name]
            w, e = materialise(got[name], base), materialise(exp[name], base)
            assert got[name].values.device.type == "cpu" and w.shape == base.shape
            assert (w - e).abs().max().item() <= tol
            outside = torch.ones(w.shape[0], dtype=torch.bool)
            outside[rows] = False
            assert torch.equal(_bits(w[outside]), _bits(base[outside])), (step, name)
            assert step == 0 or not torch.equal(w[rows], base[rows]), (step, name)
    # merge_rows on a fresh base model gives exactly the weights validated at the best step
    merged = copy.deepcopy(small.model)
    merge_rows(merged, small.rows, result.best)
    for name, p in merged.named_parameters():
        want_w = (materialise(seen[VALS.index(0.5)][name], small.base[name]) if name in small.rows
                  else small.base[name])
        assert torch.equal(_bits(p), _bits(want_w)), name
    return diff


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_sgd_matches_the_plain_update(small, plain_sgd, zero_stage: int) -> None:
    params = dict(small.model.named_parameters())
    frozen = [n for n in params if n not in small.rows]
    untouched: list[bool] = []

    def check() -> None:  # while training: the parameters outside rows are the base ones
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([params[n] for n in frozen]) if zero_stage == 3 else None
        with gather or nullcontext():  # under ZeRO-3 they are partitioned (empty) outside a gather
            untouched.append(all(torch.equal(params[n], small.base[n]) for n in frozen))

    seen: list[dict[str, torch.Tensor]] = []
    result = zero_targeted_update(small.model, small.rows, small.examples, small.pad,
                                  _recording(VALS, seen, check), lr=1.0, steps=STEPS, micro_batch_size=MICRO,
                                  zero_stage=zero_stage, progress=False)
    diff = _check_against_plain(small, plain_sgd, result, seen, TOL_SGD)
    print(f"ZeRO-{zero_stage} SGD: max abs difference to the plain update {diff:.3g}")
    assert untouched == [True] * len(VALS)
    _assert_plain_base(small)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_adam_matches_the_plain_update(small, plain_adam, zero_stage: int) -> None:
    seen: list[dict[str, torch.Tensor]] = []
    result = zero_targeted_update(small.model, small.rows, small.examples, small.pad, _recording(VALS, seen),
                                  lr=1e-3, steps=STEPS, optimizer="adam", micro_batch_size=MICRO,
                                  zero_stage=zero_stage, progress=False)
    diff = _check_against_plain(small, plain_adam, result, seen, TOL_ADAM)
    every = torch.cat([(a - b).abs().flatten() for a, b in zip(result.best, plain_adam[0].best,
                                                               strict=True)])
    bulk = every.quantile(0.999).item()
    print(f"ZeRO-{zero_stage} Adam: max abs difference to the plain update {diff:.3g}, 99.9% {bulk:.3g}")
    assert bulk <= TOL_ADAM_BULK
    _assert_plain_base(small)


@pytest.mark.slow
def test_best_updated_step_matches_the_plain_update_when_step_zero_wins(small) -> None:
    vals = [0.9, 0.3, 0.5, 0.4]  # steps 0, 2, 4, 6: step 0 wins; of steps >= 1, step 4
    model = copy.deepcopy(small.model)
    want = targeted_update(model, RowDeltas(model, small.rows), small.examples, small.pad, _scripted(vals),
                           lr=1.0, steps=STEPS, micro_batch_size=MICRO, progress=False)
    got = zero_targeted_update(small.model, small.rows, small.examples, small.pad, _scripted(vals), lr=1.0,
                               steps=STEPS, micro_batch_size=MICRO, zero_stage=2, progress=False)
    assert (got.best_step, got.best_val) == (want.best_step, want.best_val) == (0, 0.9)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in got.best)
    assert (got.best_updated_step, got.best_updated_val) == (want.best_updated_step,
                                                             want.best_updated_val) == (4, 0.5)
    assert max(d.abs().max().item() for d in want.best_updated) > 1e-3
    assert _max_diff(got.best_updated, want.best_updated) <= TOL_SGD
    _assert_plain_base(small)


@pytest.mark.slow
def test_calls_in_a_row_on_one_model(small) -> None:
    """The caller's pattern: many updates (other lrs, trials) on the same in-memory model."""
    runs = []
    for lr in (1.0, 1.0, 0.5):
        result = zero_targeted_update(small.model, small.rows, small.examples, small.pad,
                                      _recording(VALS, []), lr=lr, steps=STEPS, micro_batch_size=MICRO,
                                      progress=False)
        _assert_plain_base(small)
        runs.append(result)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].best, runs[1].best, strict=True))
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    assert _max_diff(runs[0].best, runs[2].best) > 1e-3  # another lr, another update


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_nan_loss_raises_and_leaves_the_model_restored(small, plain_sgd, zero_stage: int) -> None:
    model = small.model
    o_proj = model.model.layers[1].self_attn.o_proj.weight  # not a trained parameter
    with torch.no_grad():
        o_proj.fill_(float("nan"))
    try:
        with pytest.raises(UpdateError, match=r"update loss is nan at step 1 \(lr 1.0\): lower update.lr"):
            zero_targeted_update(model, small.rows, small.examples, small.pad, _recording(VALS, []), lr=1.0,
                                 steps=STEPS, micro_batch_size=MICRO, zero_stage=zero_stage, progress=False)
        assert torch.isnan(o_proj).all()
    finally:
        with torch.no_grad():
            o_proj.copy_(small.base["model.layers.1.self_attn.o_proj.weight"])
    _assert_plain_base(small)
    # the engine was torn down on the error: the next update runs as usual
    result = zero_targeted_update(model, small.rows, small.examples, small.pad, _recording(VALS, []), lr=1.0,
                                  steps=STEPS, micro_batch_size=MICRO, zero_stage=zero_stage, progress=False)
    assert _max_diff(result.best, plain_sgd[0].best) <= TOL_SGD
    _assert_plain_base(small)


def test_nothing_to_train_raises(small) -> None:
    with pytest.raises(UpdateError, match="no localisation examples"):
        zero_targeted_update(small.model, small.rows, [], small.pad, lambda w: 0.0, progress=False)
    empty = {name: torch.tensor([], dtype=torch.long) for name in small.rows}
    for rows in ({}, empty):
        with pytest.raises(UpdateError, match="no weight rows"):
            zero_targeted_update(small.model, rows, small.examples, small.pad, lambda w: 0.0, progress=False)
    _assert_plain_base(small)


def test_deepspeed_env_sets_only_what_is_missing(monkeypatch) -> None:
    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "DS_ACCELERATOR"]
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    added = deepspeed_env("gloo")
    assert set(added) == set(keys) - {"MASTER_ADDR"}
    assert {k: os.environ[k] for k in keys} == {**added, "MASTER_ADDR": "10.1.2.3"}
    assert (added["RANK"], added["WORLD_SIZE"], added["DS_ACCELERATOR"]) == ("0", "1", "cpu")
    assert 0 < int(added["MASTER_PORT"]) < 65536
    assert deepspeed_env("gloo") == {}
    monkeypatch.delenv("DS_ACCELERATOR")
    assert deepspeed_env("nccl") == {}  # a GPU backend leaves the accelerator to DeepSpeed
