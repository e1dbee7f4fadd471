"""Weight-sparse training and circuit pruning: the invariants and formulas of the method doc,
checked on real (tiny) models; no mocks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cca_ray.circuits.graph import circuit_edges, edge_counts, geometric_mean
from cca_ray.circuits.model import ModelSpec, SparseGPT, abs_topk
from cca_ray.circuits.prune import (
    MeanAblation,
    PruneSpec,
    bisect_smallest,
    heaviside,
    node_means,
    node_order,
    prune,
    top_k_keep,
)
from cca_ray.circuits.tasks import TaskBatch
from cca_ray.circuits.train import (
    TrainSpec,
    kept_count,
    l0_fraction,
    load_model,
    lr_at,
    rescale_grads_,
    topk_mask,
    train,
)

SPEC = ModelSpec(vocab_size=40, n_layer=2, d_model=32, d_head=8, d_mlp=64, n_ctx=16)


def _tokens(n: int = 4000, seed: int = 0) -> torch.Tensor:
    # a learnable stream: runs of increasing ids, so training has signal
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 30, (n // 8,), generator=g)
    return (starts[:, None] + torch.arange(8)).flatten() % 40


def test_abs_topk_keeps_k_largest_magnitudes():
    x = torch.tensor([[0.5, -3.0, 1.0, 2.0, -0.1, 0.0, 4.0, -2.5]])
    y = abs_topk(x, 3)
    assert y.tolist() == [[0.0, -3.0, 0.0, 0.0, 0.0, 0.0, 4.0, -2.5]]
    big = torch.randn(5, 7, 64)
    assert int((abs_topk(big, 16) != 0).sum(-1).max()) == 16


def test_schedules_match_their_formulas():
    s = TrainSpec(steps=1000, l0_target=0.04, lr=0.02, warmup=0.01, anneal_start=0.01, anneal_end=0.5)
    assert l0_fraction(0, s) == 1.0 and l0_fraction(10, s) == 1.0
    assert l0_fraction(255, s) == pytest.approx(1 + (0.04 - 1) * (255 - 10) / 490)
    assert l0_fraction(500, s) == pytest.approx(0.04) and l0_fraction(900, s) == pytest.approx(0.04)
    # sharkfin: warmup, then linear decay, x sqrt(target / L0 now) (1 at the end of annealing)
    assert lr_at(5, s) == pytest.approx(0.02 * 0.5 * math.sqrt(0.04 / 1.0))
    assert lr_at(255, s) == pytest.approx(0.02 * (1000 - 255) / 990 * math.sqrt(0.04 / l0_fraction(255, s)))
    assert lr_at(500, s) == pytest.approx(0.02 * 500 / 990)
    assert lr_at(1000, s) == 0.0
    dense = TrainSpec(steps=1000, l0_target=1.0, lr=0.02)
    assert lr_at(500, dense) == pytest.approx(0.02 * 500 / 990)  # the dense twin: no sqrt factor


def test_topk_mask_keeps_exact_count_and_j_per_neuron():
    w = torch.randn(20, 50)
    w[3] *= 1e-6  # a neuron whose weights would all lose the global top-k
    mask = topk_mask(w, 0.1, 4)
    assert int(mask.sum()) == kept_count((20, 50), 0.1, 4) == 100
    assert int(mask[3].sum()) >= 4 and int(mask.sum(1).min()) >= 4
    kept_mag = w.abs()[mask & (torch.arange(20)[:, None] != 3)]
    dropped_mag = w.abs()[~mask & (torch.arange(20)[:, None] != 3)]
    assert float(kept_mag.min()) >= float(dropped_mag.max()) or int(mask.sum(1).max()) > 4
    assert kept_count((20, 50), 0.01, 4) == 80  # the j floor wins over a tiny fraction


def test_sparsity_holds_after_every_step(tmp_path):
    s = TrainSpec(steps=24, batch_size=4, l0_target=0.1, anneal_start=0.1, anneal_end=0.5,
                  eval_every=12, eval_batches=1, checkpoint_every=100)
    seen = []

    def check(step, model):
        frac = l0_fraction(step, s)
        for name, w in model.sparse_matrices().items():
            f = min(1.0, frac * s.embed_l0_factor) if name.split(".")[0] in ("embed", "unembed") else frac
            assert int((w != 0).sum()) == kept_count(tuple(w.shape), f, s.min_per_neuron), (step, name)
        seen.append(step)

    model = train(SPEC, s, _tokens(), _tokens(800, 1), tmp_path / "m", progress=False, on_step=check)
    assert seen == list(range(1, 25))
    q = model.blocks[0].q.weight
    assert int((q != 0).sum()) == kept_count(tuple(q.shape), 0.1, 4) < q.numel() // 2


def test_gradient_is_rescaled_to_rms_one():
    torch.manual_seed(0)
    model = SparseGPT(SPEC)
    model(_tokens(64).view(4, 16)).pow(2).mean().backward()
    rescale_grads_(model)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert float(grads.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-4)


def test_training_resumes_from_its_checkpoint_exactly(tmp_path):
    s = TrainSpec(steps=10, batch_size=4, l0_target=0.2, eval_every=5, eval_batches=1, checkpoint_every=5)
    full = train(SPEC, s, _tokens(), _tokens(800, 1), tmp_path / "full", progress=False)

    def crash(step, model):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(SPEC, s, _tokens(), _tokens(800, 1), tmp_path / "resumed", progress=False, on_step=crash)
    assert (tmp_path / "resumed" / "checkpoint" / "optimizer.safetensors").is_file()
    resumed = train(SPEC, s, _tokens(), _tokens(800, 1), tmp_path / "resumed", progress=False)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    again = load_model(tmp_path / "resumed")
    torch.testing.assert_close(again.blocks[1].mlp_out.weight, resumed.blocks[1].mlp_out.weight)


def test_heaviside_forward_and_surrogate_gradient():
    tau = torch.tensor([-0.7, -0.1, 0.0, 0.2, 0.9], requires_grad=True)
    for temp in (1.0, 0.3):
        out = heaviside(tau, temp)
        assert out.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
        (grad,) = torch.autograd.grad(out, tau, torch.ones(5))
        sig = torch.sigmoid(tau.detach() / temp)
        torch.testing.assert_close(grad, sig * (1 - sig) / temp)


def test_scored_logits_by_length_groups_equal_the_whole_forward_pass_and_its_gradient():
    """last_logits runs rows in groups of similar length, each cut after its longest scored position,
    with the last block's queries, attention output and MLP only at the scored positions, and returns
    them in the rows' order: the same logits, and the same gradient for the gates of every node
    location, as one forward pass over the full width (rows of mixed lengths, a row subset in shuffled
    order, sinks with nonzero logits so a wrong causal mask or sink slot would show)."""
    from cca_ray.circuits.prune import last_logits

    torch.manual_seed(0)
    model = SparseGPT(SPEC)
    with torch.no_grad():
        for block in model.blocks:
            block.sink.normal_()
    g = torch.Generator().manual_seed(1)
    n = 24
    tokens, last = torch.randint(1, 40, (n, 16), generator=g), torch.randint(2, 16, (n,), generator=g)
    batch = TaskBatch(tokens=tokens, last=last,
                      correct=torch.ones(n, dtype=torch.long), alternative=torch.full((n,), 2),
                      label=torch.ones(n), token_a=1, token_b=2, name="mixed")
    rows = torch.tensor([17, 3, 3, 22, 0, 9, 11])
    start = {name: 0.5 + 0.5 * torch.rand(d, generator=g) for name, d in model.node_locations().items()}
    for pick in (None, rows):
        tokens, last = (batch.tokens, batch.last) if pick is None else (batch.tokens[pick], batch.last[pick])
        grads = []
        for run in ("whole", "grouped"):
            gates = {name: v.clone().requires_grad_(True) for name, v in start.items()}
            model.node_fn = lambda name, x, gates=gates: x * gates[name]
            if run == "whole":
                logits = model(tokens)[torch.arange(len(last)), last]
                whole = logits.detach()
            else:
                logits = last_logits(model, batch, pick, buckets=4)
                torch.testing.assert_close(logits.detach(), whole, rtol=1e-5, atol=1e-5)
            (logits[:, 1] - logits[:, 2]).pow(2).sum().backward()
            grads.append({name: v.grad for name, v in gates.items()})
        assert all(grads[0][name].abs().sum() > 0 for name in start)  # every location matters here
        for name in start:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5)
    model.node_fn = None


def test_mean_ablation_replaces_a_pruned_node_with_its_stored_mean():
    torch.manual_seed(0)
    model = SparseGPT(SPEC)
    toks = _tokens()
    means = node_means(model, toks, windows=32, batch_size=8)
    # the means are the averages over the same windows
    rec = {}
    model.node_fn = lambda n, x: rec.setdefault(n, []).append(x.detach()) or x
    from cca_ray.circuits.train import batches

    model(batches(toks, 16, 32, torch.Generator().manual_seed(0))[:, :-1])
    torch.testing.assert_close(means["L1.mlp"], torch.cat(rec["L1.mlp"]).flatten(0, 1).mean(0))
    batch = toks[:48].view(3, 16)
    gates = {n: torch.ones(d) for n, d in model.node_locations().items()}
    gates["L1.mlp"][5] = 0.0
    ablate = MeanAblation(means, gates)
    seen = {}

    def watch(n, x):
        y = ablate(n, x)
        seen[n] = (x.detach(), y.detach())
        return y

    model.node_fn = watch
    ablated_logits = model(batch)
    before, after = seen["L1.mlp"]
    assert torch.all(after[..., 5] == means["L1.mlp"][5])
    torch.testing.assert_close(after[..., :5], before[..., :5])
    model.node_fn = MeanAblation(means, {n: torch.ones(d) for n, d in model.node_locations().items()})
    kept_logits = model(batch)
    model.node_fn = None
    torch.testing.assert_close(kept_logits, model(batch))
    assert not torch.allclose(ablated_logits, kept_logits)


# ---- a constructed toy model: the binary logit is a weighted sum of its nodes ---------------------

class _Toy(nn.Module):
    """Nodes 'L0.mlp' [n]: each is +1 (token 1 at the last position) or -1; logit A - B = sum w_i x_i."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w
        self.spec = SimpleNamespace(n_ctx=8)
        self.node_fn = None
        self.dummy = nn.Parameter(torch.zeros(1))

    def node_locations(self) -> dict[str, int]:
        return {"L0.mlp": len(self.w)}

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        sign = (tokens == 1).float() * 2 - 1
        x = sign[..., None].expand(*tokens.shape, len(self.w))
        if self.node_fn is not None:
            x = self.node_fn("L0.mlp", x)
        d = (x * self.w).sum(-1)
        logits = torch.stack([torch.zeros_like(d), d / 2, -d / 2], -1)  # vocab: pad, A, B
        return logits if positions is None else logits[torch.arange(len(positions)), positions]


def _toy_batch(pairs: int) -> TaskBatch:
    tokens = torch.tensor([[0, 1], [0, 2]] * pairs)
    label = torch.tensor([1.0, -1.0] * pairs)
    correct = torch.tensor([1, 2] * pairs)
    return TaskBatch(tokens=tokens, last=torch.ones(2 * pairs, dtype=torch.long), correct=correct,
                     alternative=3 - correct, label=label, token_a=1, token_b=2, name="toy")


def test_bisection_returns_the_smallest_kept_set_reaching_the_target():
    assert bisect_smallest(lambda k: 10 - k, 10, 3.5) == 7
    assert bisect_smallest(lambda k: 1.0, 10, 0.5) is None
    assert bisect_smallest(lambda k: 0.0, 10, 0.5) == 0
    # the toy: sorted weights, taus ordering them; loss falls as nodes are added
    w = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.05])
    model = _Toy(w)
    means = {"L0.mlp": torch.zeros(8)}
    order = node_order({"L0.mlp": torch.linspace(1, -1, 8)})
    val = _toy_batch(4)
    from cca_ray.circuits.prune import circuit_logit, loss_from_logit

    def loss_of_k(k):
        keep = top_k_keep(order, k, model.node_locations())
        return loss_from_logit(circuit_logit(model, means, keep, val), val)

    target = float(torch.nn.functional.softplus(-w[:4].sum())) + 1e-6  # reached with the top 4 exactly
    k = bisect_smallest(loss_of_k, 8, target)
    brute = min(k for k in range(9) if loss_of_k(k) <= target)
    assert k == brute == 4


def test_prune_finds_the_one_node_that_carries_the_task_and_checks_it():
    w = torch.tensor([4.0] + [0.02] * 15)
    model = _Toy(w)
    means = {"L0.mlp": torch.zeros(16)}
    s = PruneSpec(steps=150, batch_pairs=8, lr=3e-2, k_coef=1e-2, target_loss=0.15)
    result = prune(model, means, _toy_batch(16), _toy_batch(8), _toy_batch(8), s)
    assert result["reached"] and result["n_nodes"] == 1
    assert result["keep"] == {"L0.mlp": [0]}
    assert result["sufficient"] and result["task_loss"] <= 0.15
    assert result["necessary"] and result["necessity_loss"] > 0.5  # without node 0 the logit is ~0.3
    assert result["learned_kept"] < 16  # the penalty pruned the useless nodes in training


def test_circuit_edges_are_nonzero_weights_between_kept_nodes():
    torch.manual_seed(0)
    model = SparseGPT(SPEC)
    with torch.no_grad():
        model.blocks[0].q.weight.zero_()
        model.blocks[0].q.weight[3, 1] = 0.5   # attn_in 1 -> q 3
        model.blocks[0].mlp_out.weight[2, 7] = 0.0  # mlp 7 -/-> mlp_out 2
    keep = {"L0.attn_in": [1, 2], "L0.q": [3, 4], "L0.mlp": [7], "L0.mlp_out": [2], "L1.attn_in": [2, 5]}
    edges = {(e["src"], e["dst"]): e for e in circuit_edges(model, keep)}
    assert ("L0.attn_in.1", "L0.q.3") in edges and edges[("L0.attn_in.1", "L0.q.3")]["weight"] == 0.5
    assert not any(d.startswith("L0.q") for _, d in edges if _ != "L0.attn_in.1")
    assert ("L0.mlp.7", "L0.mlp_out.2") not in edges
    assert edges[("L0.mlp_out.2", "L1.attn_in.2")]["kind"] == "residual"
    assert ("L0.mlp_out.2", "L1.attn_in.5") not in edges  # residual edges join the same channel only
    kept = {f"{n}.{i}" for n, ix in keep.items() for i in ix}
    assert all(s in kept and d in kept for s, d in edges)
    # the paper's edge count leaves the residual links out; they are counted beside it
    weights, residual = edge_counts(list(edges.values()))
    assert residual == sum(e["kind"] == "residual" for e in edges.values()) >= 1
    assert weights == len(edges) - residual and weights >= 1
    # the final norm's output (the unembedding's read) joins the residual links, never the weight edges
    final = {(e["src"], e["dst"]): e for e in circuit_edges(model, {**keep, "L2.final": [2, 9]})}
    assert final[("L0.mlp_out.2", "L2.final.2")]["kind"] == "residual"
    assert edge_counts(list(final.values())) == (weights, residual + 1)


def test_the_unembeddings_read_is_a_node_that_removes_the_direct_path():
    """With every other node kept, mean-ablating the final norm's output leaves logits that no longer
    depend on the input (the bigram table aside: off here): the embedding's direct path to the logits
    is ablatable, so a circuit need not spend nodes cancelling what it says about the last token."""
    torch.manual_seed(0)
    model = SparseGPT(SPEC)
    locations = model.node_locations()
    assert list(locations)[-1] == "L2.final" and locations["L2.final"] == SPEC.d_model
    toks = _tokens()
    means = node_means(model, toks, windows=32, batch_size=8)
    rows = toks[:48].view(3, 16)
    gates = {n: torch.ones(d) for n, d in locations.items()}
    model.node_fn = MeanAblation(means, gates)
    kept = model(rows)
    gates["L2.final"] = torch.zeros(SPEC.d_model)
    ablated = model(rows)
    model.node_fn = None
    assert kept.std(dim=(0, 1)).mean() > 0.1  # the logits vary with the input...
    torch.testing.assert_close(ablated, ablated[:1, :1].expand_as(ablated))  # ...and without the read do not


def test_geometric_mean_of_ratios():
    assert geometric_mean([4.0, 16.0]) == pytest.approx(8.0)
    assert geometric_mean([None, 2.0]) == pytest.approx(2.0)
    assert geometric_mean([]) is None
