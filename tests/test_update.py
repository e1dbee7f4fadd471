"""Targeted update on tiny random Llama models: row deltas equal merged weights, only the selected rows
train, best-step bookkeeping, errors, micro-batch accumulation, and the sparse delta round trip
through the real `cca-ray apply-delta` command, bit for bit."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from cca_ray.cli import main as cli_main
from cca_ray.components import KINDS, component_space
from cca_ray.dcm import Example, full_logits, logit_difference
from cca_ray.update import (
    RowDeltas,
    UpdateError,
    apply_delta_to,
    keep_best,
    load_delta,
    merge_rows,
    save_delta,
    schedule,
    selected_rows,
    targeted_update,
)

PAD = 0
DIMS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=100, initializer_range=0.2)


def _model(seed: int = 0, **overrides) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**DIMS, **overrides})).float().eval()


def _examples(n: int = 12, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        desired, undesired = rng.sample(range(1, DIMS["vocab_size"]), 2)
        ids = [rng.randrange(1, DIMS["vocab_size"]) for _ in range(rng.randrange(3, 12))]
        out.append(Example(ids, desired, undesired))
    return out


def _selection(model, seed: int = 0, p: float = 0.2) -> dict[str, torch.Tensor]:
    """A random selection of components of every kind (each kind non-empty)."""
    space = component_space(model)
    gen = torch.Generator().manual_seed(seed)
    sel = {k: torch.rand(space.shape(k), generator=gen) < p for k in KINDS}
    for s in sel.values():
        s[0, 0] = True
    return sel


def _rows_and_deltas(model, seed: int = 0) -> tuple[dict[str, torch.Tensor], RowDeltas]:
    rows = selected_rows(model, component_space(model), _selection(model, seed))
    return rows, RowDeltas(model, rows)


def _randomise(deltas: RowDeltas, seed: int = 1, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    deltas.load([scale * torch.randn(d.shape, generator=gen) for d in deltas.deltas])


def _loss(model, examples: list[Example]) -> torch.Tensor:
    return -logit_difference(full_logits(model, examples, PAD), examples).mean()


def _scripted(values: list[float]):
    """A validate() callback returning the given values in order (one per validation step)."""
    it = iter(values)
    return lambda weights: next(it)


INPUT = torch.tensor([[5, 17, 42, 8, 99, 3], [61, 2, 7, 33, 14, 50]])


# ---------------------------------------------------------------- rows


def test_selected_rows_map_heads_and_neurons() -> None:
    model = _model()
    space = component_space(model)
    sel = {k: torch.zeros(space.shape(k), dtype=torch.bool) for k in KINDS}
    sel["q"][1, 2] = True
    sel["k"][0, 1] = True
    sel["mlp"][0, 5] = True
    sel["mlp"][0, 95] = True
    hd = space.head_dim
    rows = selected_rows(model, space, sel)
    assert {n: r.tolist() for n, r in rows.items()} == {
        "model.layers.0.mlp.up_proj.weight": [5, 95],
        "model.layers.0.self_attn.k_proj.weight": list(range(hd, 2 * hd)),
        "model.layers.1.self_attn.q_proj.weight": list(range(2 * hd, 3 * hd)),
    }
    only_mlp = selected_rows(model, space, sel, kinds=("mlp",))
    assert list(only_mlp) == ["model.layers.0.mlp.up_proj.weight"]
    only_heads = selected_rows(model, space, sel, kinds=("q", "k", "v"))
    assert set(only_heads) == {"model.layers.0.self_attn.k_proj.weight",
                               "model.layers.1.self_attn.q_proj.weight"}


def test_attached_deltas_equal_merged_weights() -> None:
    model = _model()
    rows, deltas = _rows_and_deltas(model)
    _randomise(deltas)
    merged = copy.deepcopy(model)
    merge_rows(merged, rows, deltas.snapshot())
    with torch.no_grad():
        base = model(INPUT).logits
        with deltas.attached():
            hooked = model(INPUT).logits
        after = model(INPUT).logits  # hooks removed on exit
        want = merged(INPUT).logits
    torch.testing.assert_close(hooked, want, rtol=0, atol=1e-5)
    assert (hooked - base).abs().max() > 1e-2
    assert torch.equal(after, base)
    merged_params = dict(merged.named_parameters())
    copies = deltas.merged_weights()  # what an inference engine loads: the same values, bit for bit
    assert set(copies) == set(rows)
    for name, w in copies.items():
        assert torch.equal(w, merged_params[name]), name


def test_only_the_row_deltas_get_gradients() -> None:
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    rows, deltas = _rows_and_deltas(model)
    params = dict(model.named_parameters())
    for name, d in zip(deltas.names, deltas.deltas, strict=True):
        assert d.shape == (len(rows[name]), params[name].shape[1])
    examples = _examples()
    with deltas.attached():
        _loss(model, examples).backward()
    for d in deltas.deltas:
        assert d.grad is not None and d.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_parameter_count_grows_with_the_selection_not_the_model() -> None:
    model = _model()
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    counts = []
    for p in (0.02, 0.1, 0.3):
        rows = selected_rows(model, component_space(model), _selection(model, p=p))
        deltas = RowDeltas(model, rows)
        want = sum(len(r) * params[n].shape[1] for n, r in rows.items())
        assert deltas.parameter_count() == want == sum(d.numel() for d in deltas.parameters())
        counts.append(want)
    assert counts[0] < counts[1] < counts[2]
    assert counts[0] < 0.05 * total


def test_merge_rows_touches_only_the_rows() -> None:
    model = _model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows, deltas = _rows_and_deltas(model)
    _randomise(deltas)
    new = merge_rows(model, rows, deltas.snapshot())
    for name, p in model.named_parameters():
        if name not in rows:
            assert torch.equal(p, base[name]), name
            continue
        keep = torch.ones(p.shape[0], dtype=torch.bool)
        keep[rows[name]] = False
        assert torch.equal(p[keep], base[name][keep]), name
        assert torch.equal(p[rows[name]], new[name])
        assert not torch.equal(new[name], base[name][rows[name]])


# ---------------------------------------------------------------- targeted_update


def test_schedule() -> None:
    assert schedule(50) == [0, 2, 4, 6, 8, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert schedule(7) == [0, 2, 4, 6, 7]
    assert schedule(1) == [0, 1]
    assert schedule(12, eval_every=4) == [0, 4, 8, 12]  # the fine-tuning baselines' marks
    assert schedule(10, eval_every=4) == [0, 4, 8, 10]
    assert schedule(2, eval_every=0) == [0, 1, 2]


def _counting_loop(losses: list[float], vals: list[float], steps: int, marks: list[int]):
    """keep_best on a counter: the snapshot is the number of advance() calls so far."""
    done, snaps = [0], []

    def advance() -> None:
        done[0] += 1

    def snapshot() -> list[int]:
        snaps.append([done[0]])
        return snaps[-1]

    result = keep_best(lambda step: losses[step - 1], advance, _scripted(vals), snapshot,
                       lambda snap: {"w": torch.tensor(snap)}, steps, marks, lr=0.5, trainable_parameters=3,
                       progress=False, desc="count")
    return result, done[0], snaps


def test_keep_best_bookkeeping() -> None:
    result, done, snaps = _counting_loop([3.0, 2.0, 1.0, 0.5], [0.5, 0.2, 0.4], steps=4, marks=[0, 2, 3])
    assert done == 4 and snaps == [[0], [2], [3], [4]]  # the last step is not a mark: a fresh snapshot
    assert (result.best_step, result.best_val, result.best) == (0, 0.5, [0])
    assert (result.best_updated_step, result.best_updated_val, result.best_updated) == (3, 0.4, [3])
    assert result.last == [4] and result.trainable_parameters == 3
    assert result.history == [{"step": 0, "val_accuracy": 0.5, "loss": None}, {"step": 1, "loss": 3.0},
                              {"step": 2, "loss": 2.0, "val_accuracy": 0.2},
                              {"step": 3, "loss": 1.0, "val_accuracy": 0.4}, {"step": 4, "loss": 0.5}]
    result, _, snaps = _counting_loop([3.0, 2.0], [0.1, 0.3], steps=2, marks=[0, 2])
    assert result.best is result.best_updated is result.last is snaps[-1]  # one snapshot per validation


def test_keep_best_stops_before_a_nan_step() -> None:
    with pytest.raises(UpdateError, match=r"update loss is nan at step 3 \(lr 0.5\): lower update.lr; "
                                          r"the best step so far was 2"):
        _counting_loop([1.0, 0.5, float("nan")], [0.1, 0.3], steps=4, marks=[0, 2, 4])
    done = []
    with pytest.raises(UpdateError):
        keep_best(lambda step: float("inf"), lambda: done.append(1), lambda w: 0.0, list, lambda s: {}, 3,
                  [0, 3], lr=1.0, trainable_parameters=0, progress=False)
    assert done == []  # the optimizer never stepped on the non-finite loss


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.05), ("adam", 1e-3)])
def test_loss_goes_down(optimizer: str, lr: float) -> None:
    model = _model()
    _, deltas = _rows_and_deltas(model)
    examples = _examples()
    result = targeted_update(model, deltas, examples, PAD, validate=lambda w: 0.0, lr=lr, steps=10,
                             optimizer=optimizer, micro_batch_size=4, progress=False)
    losses = [h["loss"] for h in result.history[1:]]
    assert len(losses) == 10
    assert losses[-1] < losses[0] - 0.5, losses
    assert result.trainable_parameters == deltas.parameter_count()
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    with torch.no_grad():  # the history's first loss is the base model's (deltas still zero then)
        assert losses[0] == pytest.approx(_loss(model, examples).item(), abs=1e-5)


def test_best_step_is_chosen_by_validation() -> None:
    examples = _examples()
    vals = [0.1, 0.2, 0.3, 0.5, 0.4, 0.5]  # steps 0, 2, 4, 6, 8, 10: best (first 0.5) at step 6
    model = _model()
    _, deltas = _rows_and_deltas(model)
    result = targeted_update(model, deltas, examples, PAD, validate=_scripted(vals), lr=0.05, steps=10,
                             progress=False)
    assert (result.best_step, result.best_val) == (6, 0.5)
    assert [h.get("val_accuracy") for h in result.history if "val_accuracy" in h] == vals
    final = deltas.snapshot()
    # a rerun that stops at step 6 ends with exactly the deltas kept as best
    model6 = _model()
    _, deltas6 = _rows_and_deltas(model6)
    targeted_update(model6, deltas6, examples, PAD, validate=lambda w: 0.0, lr=0.05, steps=6, progress=False)
    for best, at6, last in zip(result.best, deltas6.snapshot(), final, strict=True):
        assert torch.equal(best, at6)
        assert not torch.equal(best, last)
    assert (result.best_updated_step, result.best_updated_val) == (6, 0.5)  # the same step here
    assert all(torch.equal(a, b) for a, b in zip(result.best_updated, result.best, strict=True))


def test_no_improvement_keeps_the_base_model() -> None:
    model = _model()
    _, deltas = _rows_and_deltas(model)
    result = targeted_update(model, deltas, _examples(), PAD, validate=lambda w: 0.5, lr=0.05, steps=6,
                             progress=False)
    assert result.best_step == 0 and result.best_val == 0.5
    assert all(torch.equal(d, torch.zeros_like(d)) for d in result.best)
    assert any(d.abs().sum() > 0 for d in deltas.deltas)  # training did move the live deltas


def test_best_updated_step_is_kept_beside_a_winning_step_zero() -> None:
    examples = _examples()
    vals = [0.5, 0.2, 0.4, 0.3, 0.4, 0.1]  # steps 0, 2, 4, 6, 8, 10: step 0 wins; of steps >= 1, step 4
    model = _model()
    _, deltas = _rows_and_deltas(model)
    result = targeted_update(model, deltas, examples, PAD, validate=_scripted(vals), lr=0.05, steps=10,
                             progress=False)
    assert (result.best_step, result.best_val) == (0, 0.5)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in result.best)
    assert (result.best_updated_step, result.best_updated_val) == (4, 0.4)
    model4 = _model()  # a rerun that stops at step 4 ends with exactly the best updated deltas
    _, deltas4 = _rows_and_deltas(model4)
    targeted_update(model4, deltas4, examples, PAD, validate=lambda w: 0.0, lr=0.05, steps=4, progress=False)
    for got, want in zip(result.best_updated, deltas4.snapshot(), strict=True):
        assert torch.equal(got, want) and got.abs().sum() > 0


def test_best_updated_step_with_one_step_is_step_one() -> None:
    model = _model()
    _, deltas = _rows_and_deltas(model)
    result = targeted_update(model, deltas, _examples(), PAD, validate=_scripted([0.9, 0.1]), lr=0.05,
                             steps=1, progress=False)
    assert (result.best_step, result.best_updated_step, result.best_updated_val) == (0, 1, 0.1)


def _direct_diffs(model, examples: list[Example]) -> list[float]:
    """logit[desired] - logit[undesired] at the last position, one unpadded forward per example."""
    out = []
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e.ids])).logits[0, -1]
            out.append((logits[e.desired] - logits[e.undesired]).item())
    return out


def _direct_stats(diffs: list[float], base: list[float]) -> dict:
    wrong = [i for i, b in enumerate(base) if b <= 0]
    return {"n": len(diffs), "mean_logit_diff": sum(diffs) / len(diffs),
            "desired_wins": sum(d > 0 for d in diffs) / len(diffs), "base_wrong": len(wrong),
            "flip_rate": sum(diffs[i] > 0 for i in wrong) / len(wrong) if wrong else None}


def test_pivot_diagnostics_equal_a_direct_computation() -> None:
    from cca_ray.update.diagnostics import pivot_diagnostics

    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows, deltas = _rows_and_deltas(model)
    _randomise(deltas, scale=0.5)
    sets = {"train": _examples(10, seed=1), "held_out": _examples(7, seed=2)}
    states = {"moved": deltas.snapshot(), "zero": [0 * d for d in deltas.snapshot()]}
    got = pivot_diagnostics(model, rows, states, sets, PAD, batch_size=3)
    merged = copy.deepcopy(model)
    merge_rows(merged, rows, deltas.snapshot())
    flips = []
    for name, examples in sets.items():
        base, moved = _direct_diffs(model, examples), _direct_diffs(merged, examples)
        assert got["base"][name] == pytest.approx(_direct_stats(base, base), abs=1e-5)
        assert got["zero"][name] == got["base"][name]
        assert got["moved"][name] == pytest.approx(_direct_stats(moved, base), abs=1e-4)
        assert got["base"][name]["flip_rate"] in (0.0, None)
        flips.append(got["moved"][name]["flip_rate"])
    assert any(f is not None and 0 < f for f in flips)  # the deltas do flip pivots: the test can tell
    assert got["moved"]["train"] != got["base"]["train"]
    assert _hooks_left(model) == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _hooks_left(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_exploding_lr_raises() -> None:
    model = _model()
    _, deltas = _rows_and_deltas(model)
    with pytest.raises(UpdateError, match="lower update.lr"):
        targeted_update(model, deltas, _examples(), PAD, validate=lambda w: 0.0, lr=1e30, steps=5,
                        progress=False)


def test_nan_weights_raise() -> None:
    model = _model()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.fill_(float("nan"))
    _, deltas = _rows_and_deltas(model)
    with pytest.raises(UpdateError, match="loss is nan at step 1"):
        targeted_update(model, deltas, _examples(), PAD, validate=lambda w: 0.0, lr=1e-3, steps=3,
                        progress=False)


def test_empty_inputs_raise() -> None:
    model = _model()
    _, deltas = _rows_and_deltas(model)
    with pytest.raises(UpdateError, match="no localisation examples"):
        targeted_update(model, deltas, [], PAD, validate=lambda w: 0.0, progress=False)
    empty = RowDeltas(model, {})
    with pytest.raises(UpdateError, match="no weight rows"):
        targeted_update(model, empty, _examples(), PAD, validate=lambda w: 0.0, progress=False)


def test_micro_batches_accumulate_the_full_batch_gradient() -> None:
    """One sgd step with lr 1 leaves deltas == -gradient; it must not depend on the micro-batch size."""
    examples = _examples(n=11)  # 11 = 4 + 4 + 3: an uneven last micro-batch
    after = {}
    for micro in (1, 4, 11):
        model = _model()
        _, deltas = _rows_and_deltas(model)
        targeted_update(model, deltas, examples, PAD, validate=lambda w: 0.0, lr=1.0, steps=1,
                        micro_batch_size=micro, progress=False)
        after[micro] = deltas.snapshot()
    # the full-batch gradient computed directly
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    _, deltas = _rows_and_deltas(model)
    with deltas.attached():
        _loss(model, examples).backward()
    grads = [-d.grad for d in deltas.deltas]
    assert any(g.abs().max() > 1e-3 for g in grads)
    for micro, got in after.items():
        for g, a in zip(grads, got, strict=True):
            torch.testing.assert_close(a, g, rtol=1e-5, atol=1e-5, msg=lambda m, micro=micro: f"{micro}: {m}")


# ---------------------------------------------------------------- sparse delta round trip


def _save_base(model, folder: Path) -> Path:
    from cca_ray.tiny.tokenizer import train_tokenizer

    model.save_pretrained(folder, safe_serialization=True)
    tokenizer = train_tokenizer(["Q: Tom has 3 apples and buys 4 more. A: The final answer is 7."])
    tokenizer.save_pretrained(folder)
    return folder


def test_delta_round_trip_through_the_cli_is_bit_exact(tmp_path: Path) -> None:
    model = _model()
    base = _save_base(model, tmp_path / "base")
    base_tensors = load_file(str(base / "model.safetensors"))
    rows, deltas = _rows_and_deltas(model)
    result = targeted_update(model, deltas, _examples(), PAD, validate=_scripted([0, 1, 2, 3]), lr=0.05,
                             steps=6, progress=False)
    assert result.best_step == 6
    merged = copy.deepcopy(model)
    values = merge_rows(merged, rows, result.best)
    merged.save_pretrained(tmp_path / "merged", safe_serialization=True)
    delta_path = save_delta(rows, values, tmp_path / "delta.safetensors", base=str(base), extra={"lr": 0.05})
    assert delta_path.stat().st_size < 0.5 * (base / "model.safetensors").stat().st_size

    assert cli_main(["apply-delta", str(base), str(delta_path), str(tmp_path / "out")]) == 0
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(out) == set(want) == set(base_tensors)
    for name, tensor in want.items():
        assert torch.equal(out[name], tensor), name
    changed = 0
    for name, tensor in base_tensors.items():
        if name not in rows:
            assert torch.equal(out[name], tensor), name
            continue
        keep = torch.ones(tensor.shape[0], dtype=torch.bool)
        keep[rows[name]] = False
        assert torch.equal(out[name][keep], tensor[keep]), name
        changed += int(not torch.equal(out[name][rows[name]], tensor[rows[name]]))
    assert changed == len(rows)  # every selected weight really moved
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_delta_for_another_model_is_rejected(tmp_path: Path) -> None:
    model = _model()
    rows, deltas = _rows_and_deltas(model)
    _randomise(deltas)
    values = merge_rows(copy.deepcopy(model), rows, deltas.snapshot())

    wider = _model(hidden_size=32, head_dim=8)  # same names, other shapes
    path = save_delta(rows, values, tmp_path / "d.safetensors", base="x")
    with pytest.raises(ValueError, match="do not fit its shape"):
        apply_delta_to(wider, load_delta(path))

    renamed = {n.replace("model.layers", "transformer.h"): r for n, r in rows.items()}
    other = save_delta(renamed, {n.replace("model.layers", "transformer.h"): v for n, v in values.items()},
                       tmp_path / "other.safetensors", base="x")
    with pytest.raises(ValueError, match="lacks"):
        apply_delta_to(model, load_delta(other))

    name = next(iter(rows))
    past_end = {name: torch.tensor([DIMS["intermediate_size"] + 1000])}
    bad = save_delta(past_end, {name: values[name][:1]}, tmp_path / "bad.safetensors", base="x")
    with pytest.raises(ValueError, match="do not fit"):
        apply_delta_to(model, load_delta(bad))

    for bad_rows, bad_values in ((torch.tensor([-1]), values[name][:1]), (rows[name][:2], values[name][:1])):
        bad = save_delta({name: bad_rows}, {name: bad_values}, tmp_path / "bad.safetensors", base="x")
        with pytest.raises(ValueError, match="do not fit"):
            apply_delta_to(model, load_delta(bad))

    base = _save_base(_model(hidden_size=32, head_dim=8), tmp_path / "wider")
    with pytest.raises(ValueError, match="do not fit its shape"):
        cli_main(["apply-delta", str(base), str(path), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_gradient_checkpointing_gives_the_same_deltas() -> None:
    """Checkpointed decoder layers (recomputed in the backward) train the same deltas as the plain
    update: the gradients reach the row deltas' hooks through the recompute, the dropout stays off
    (attention_dropout 0.5 would show), and the model comes back as it was (eval mode, no checkpointing)."""
    examples = _examples(n=12)
    after, calls = {}, {}
    for ckpt in (False, True):
        model = _model(attention_dropout=0.5)
        _, deltas = _rows_and_deltas(model)
        counts: list[int] = []
        model.model.layers[0].register_forward_pre_hook(lambda *_, counts=counts: counts.append(1))
        targeted_update(model, deltas, examples, PAD, validate=lambda w: 0.0, lr=0.5, steps=4,
                        micro_batch_size=5, gradient_checkpointing=ckpt, progress=False)
        after[ckpt], calls[ckpt] = deltas.snapshot(), len(counts)
        assert not model.is_gradient_checkpointing
        assert not any(m.training for m in model.modules())
        assert not getattr(model, "_require_grads_hooks", None)
    assert calls == {False: 4 * 3, True: 2 * 4 * 3}  # 3 micro-batches a step; checkpointed: recomputed
    assert max(d.abs().max().item() for d in after[False]) > 1e-2  # the deltas moved
    for plain, checkpointed in zip(after[False], after[True], strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)
