"""Issue 18's matched-loss dense twin and the bridges between a dense model and its sparse twin,
on real tiny models: a constructed sparse twin (the dense model in a rotated residual basis) has
an exact linear bridge, which training must find from a random start."""

from __future__ import annotations

import json

import pytest
import torch

from cca_ray.circuits.artifacts import Artifacts
from cca_ray.circuits.bridges import (
    Bridges,
    BridgeSpec,
    bridge_loss,
    bridged_task_losses,
    residuals,
    run_from,
    train_bridges,
)
from cca_ray.circuits.config import CircuitsConfig
from cca_ray.circuits.model import ModelSpec, SparseGPT
from cca_ray.circuits.tasks import TaskBatch
from cca_ray.circuits.train import TrainSpec, train

SPEC = ModelSpec(vocab_size=40, n_layer=2, d_model=32, d_head=8, d_mlp=64, n_ctx=16, bigram=True,
                 act_topk_fraction=None)


def _tokens(n: int = 4000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 30, (n // 8,), generator=g)
    return (starts[:, None] + torch.arange(8)).flatten() % 40


def _rotated(model: SparseGPT, q: torch.Tensor) -> SparseGPT:
    """The same function with the residual stream h written as h @ q (q orthogonal; norm gains are
    1, so RMSNorm commutes with the rotation): readers get W q, writers q^T W."""
    twin = SparseGPT(model.spec)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        twin.embed.weight.copy_(model.embed.weight @ q)
        twin.unembed.weight.copy_(model.unembed.weight @ q)
        for b, src in zip(twin.blocks, model.blocks, strict=True):
            for name in ("q", "k", "v", "mlp_in"):
                getattr(b, name).weight.copy_(getattr(src, name).weight @ q)
            for name in ("o", "mlp_out"):
                getattr(b, name).weight.copy_(q.T @ getattr(src, name).weight)
    return twin


def _task_batch(model: SparseGPT, n: int = 64, seed: int = 1) -> TaskBatch:
    """Random contexts labelled by the model's own choice between tokens 3 and 5: its loss is low,
    and a forward pass that loses the residual stream's information scores near chance."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 40, (n, 12), generator=g)
    with torch.no_grad():
        logits = model(tokens)[:, -1]
    label = torch.where(logits[:, 3] > logits[:, 5], 1.0, -1.0)
    correct = torch.where(label > 0, 3, 5)
    return TaskBatch(tokens=tokens, last=torch.full((n,), 11), correct=correct, alternative=8 - correct,
                     label=label, token_a=3, token_b=5, name="toy")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    dense = SparseGPT(SPEC)
    with torch.no_grad():  # task logits far from 0 and carried by the residual stream, not the bigram table
        dense.unembed.weight.mul_(4.0)
        dense.bigram.normal_(0, 0.01)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)))
    return dense, _rotated(dense, q), q


def test_the_rotated_twin_computes_the_same_function_and_residuals_are_rotated(pair):
    dense, sparse, q = pair
    x = _tokens(64).view(4, 16)
    torch.testing.assert_close(sparse(x), dense(x), atol=1e-4, rtol=1e-4)
    for h_d, h_s in zip(residuals(dense, x), residuals(sparse, x), strict=True):
        torch.testing.assert_close(h_d @ q, h_s, atol=1e-4, rtol=1e-4)
    # run_from continues a residual stream: the sparse model's own residual at site 1 gives its logits
    again = run_from(sparse, residuals(sparse, x)[1], 1, x)
    torch.testing.assert_close(again, sparse(x), atol=1e-5, rtol=1e-5)
    # and an exact bridge (the rotation) has zero loss, while the identity bridge does not
    exact, identity = (Bridges(32, 32, 4, topk_fraction=None) for _ in range(2))
    with torch.no_grad():
        for s in range(4):
            exact.enc[s].weight.copy_(q.T)
            exact.dec[s].weight.copy_(q)
            for b in (exact, identity):
                b.enc[s].bias.zero_()
                b.dec[s].bias.zero_()
            identity.enc[s].weight.copy_(torch.eye(32))
            identity.dec[s].weight.copy_(torch.eye(32))
    spec = BridgeSpec()
    with torch.no_grad():
        assert float(bridge_loss(exact, dense, sparse, x, spec)[0]) < 1e-6
        assert float(bridge_loss(identity, dense, sparse, x, spec)[0]) > 0.5


def test_trained_bridges_keep_the_task_loss_near_the_dense_models(pair):
    dense, sparse, _ = pair
    batch = _task_batch(dense)
    spec = BridgeSpec(steps=200, batch_size=8, lr=1e-2, topk_fraction=None)
    untrained = bridged_task_losses(Bridges(32, 32, 4, topk_fraction=None), dense, sparse, batch)
    bridges, history = train_bridges(dense, sparse, _tokens(), spec)
    out = bridged_task_losses(bridges, dense, sparse, batch)
    assert out["sparse"] == pytest.approx(out["dense"], abs=1e-4)  # the twin computes the same function
    assert len(out["encoded"]) == len(out["decoded"]) == 4  # 2 layers x (attention, MLP)
    far = max(abs(v - out["dense"]) for v in untrained["encoded"] + untrained["decoded"])
    assert far > 0.3, untrained
    for v in out["encoded"] + out["decoded"]:
        assert abs(v - out["dense"]) < 0.05 * far + 0.02, out
    first, last = history[0], history[-1]
    for part in ("nmse_enc", "nmse_dec", "kl_enc", "kl_dec"):
        assert last[part] < 0.1 * first[part], (part, first, last)
    for m in (dense, sparse):  # frozen while bridged, trainable again after
        assert all(p.requires_grad for p in m.parameters())


def test_the_dense_twin_stops_at_the_matched_loss(tmp_path):
    s = TrainSpec(steps=40, batch_size=8, l0_target=1.0, eval_every=100, eval_batches=2,
                  checkpoint_every=1000, match_every=5)
    train(SPEC, TrainSpec(**{**s.__dict__, "stop_at_loss": -1.0}), _tokens(), _tokens(800, 1),
          tmp_path / "probe", progress=False)  # never stops early: checks every 5 steps
    history = json.loads((tmp_path / "probe" / "model.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(5, 45, 5))  # checked every match_every steps
    target = history[3]["val_loss"]  # the loss at step 20
    stop = next(h["step"] for h in history if h["val_loss"] <= target)
    train(SPEC, TrainSpec(**{**s.__dict__, "stop_at_loss": target}), _tokens(), _tokens(800, 1),
          tmp_path / "matched", progress=False)
    meta = json.loads((tmp_path / "matched" / "model.json").read_text())
    assert meta["steps_trained"] == stop <= 20
    assert meta["val_loss"] == pytest.approx(history[stop // 5 - 1]["val_loss"])
    assert meta["val_loss"] <= target


def test_a_matched_variant_is_keyed_by_its_reference_and_validated(tmp_path):
    raw = {"variants": [{"name": "sparse", "l0_target": 0.1}, {"name": "dense", "l0_target": 1.0,
                                                                 "match_loss_of": "sparse"}]}
    a = Artifacts(CircuitsConfig.model_validate(raw), tmp_path)
    other = dict(raw, variants=[{"name": "sparse", "l0_target": 0.2}, raw["variants"][1]])
    b = Artifacts(CircuitsConfig.model_validate(other), tmp_path)
    assert a.model_key("dense") != b.model_key("dense")  # the reference changed: a new stopping point
    plain = {"variants": [{"name": "sparse", "l0_target": 0.1}, {"name": "dense", "l0_target": 1.0}]}
    plain2 = {"variants": [{"name": "sparse", "l0_target": 0.2}, {"name": "dense", "l0_target": 1.0}]}
    assert (Artifacts(CircuitsConfig.model_validate(plain), tmp_path).model_key("dense")
            == Artifacts(CircuitsConfig.model_validate(plain2), tmp_path).model_key("dense"))
    unknown = {"name": "dense", "l0_target": 1.0, "match_loss_of": "nope"}
    chained = {"name": "sparse", "l0_target": 0.1, "match_loss_of": "dense"}
    for bad, words in ((dict(raw, variants=[raw["variants"][0], unknown]), "another variant"),
                       (dict(raw, variants=[chained, raw["variants"][1]]), "itself matches")):
        with pytest.raises(ValueError, match=words):
            CircuitsConfig.model_validate(bad)
