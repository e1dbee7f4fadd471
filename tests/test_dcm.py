"""DCM on tiny random Llama models: the KV-reuse path equals the full recompute (logits and mask
gradients), the per-example logit difference, and learn_mask's selection, early stop and errors."""

from __future__ import annotations

import random

import pytest
import torch
import transformers as tf

from cca_ray.components import KINDS, component_space, scaled
from cca_ray.dcm import DCMError, Example, PrefixCache, full_logits, learn_mask, logit_difference
from cca_ray.dcm import train as dcm_train

PAD = 0
DIMS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=100, initializer_range=0.2)


def _model(seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**DIMS)).float().eval()


def _examples(lengths: list[int], seed: int = 0) -> list[Example]:
    """Random prefixes of the given lengths (token 0 is the pad, never used inside a prefix)."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        desired, undesired = rng.sample(range(1, DIMS["vocab_size"]), 2)
        out.append(Example([rng.randrange(1, DIMS["vocab_size"]) for _ in range(n)], desired, undesired))
    return out


def _random_masks(model, seed: int = 1) -> dict[str, torch.Tensor]:
    space = component_space(model)
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(space.shape(k), generator=gen).requires_grad_(True) for k in KINDS}


def _loss_and_grads(model, masks, logits_fn, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Last-position logits under scales 2m, and d(-mean logit diff)/dm for every mask tensor."""
    for m in masks.values():
        m.grad = None
    with scaled(model, {k: 2 * m for k, m in masks.items()}):
        logits = logits_fn()
    (-logit_difference(logits, batch).mean()).backward()
    return logits.detach(), {k: m.grad.clone() for k, m in masks.items()}


# ---------------------------------------------------------------- KV reuse


@pytest.mark.parametrize(("dtype", "grad_rtol"), [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_kv_reuse_logits_and_mask_gradients_match_full_recompute(dtype: torch.dtype,
                                                                  grad_rtol: float) -> None:
    """float32 shows the tolerance in practice (the k/q gradients differ by ~2e-5 relative from summation
    order alone); float64 shows the two paths are the same computation (agreement to ~1e-15)."""
    model = _model().to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    examples = _examples([5, 12, 3, 9, 17, 2])  # different lengths: left padding in both paths
    cache = PrefixCache(model, examples, PAD, batch_size=4)  # built masks-off, in two chunks
    masks = {k: m.detach().to(dtype).requires_grad_(True) for k, m in _random_masks(model).items()}
    for idx in ([4, 0, 2, 5], [1, 3], [2]):
        batch = [examples[i] for i in idx]
        full, g_full = _loss_and_grads(model, masks, lambda b=batch: full_logits(model, b, PAD), batch)
        reuse, g_reuse = _loss_and_grads(model, masks, lambda i=idx: cache.logits(i), batch)
        torch.testing.assert_close(reuse, full, rtol=0, atol=1e-5)
        with torch.no_grad():
            plain = full_logits(model, batch, PAD)
        assert (full - plain).abs().max() > 1e-3  # the masks did something
        for kind in KINDS:
            assert g_full[kind].abs().sum() > 0, kind
            rel = ((g_reuse[kind] - g_full[kind]).norm() / g_full[kind].norm()).item()
            assert rel < grad_rtol, (kind, rel)


def test_cache_built_with_masks_on_would_be_wrong() -> None:
    """The cached prefix must not see the masks: built inside scaled(), its last cached position
    (the last position of prefix[:-1]) gets scaled too and the logits drift from the full path."""
    model = _model()
    examples = _examples([6, 10, 4])
    masks = {k: m.detach() for k, m in _random_masks(model).items()}
    scales = {k: 2 * m for k, m in masks.items()}
    with torch.no_grad():
        with scaled(model, scales):
            wrong_cache = PrefixCache(model, examples, PAD)
        right_cache = PrefixCache(model, examples, PAD)
        with scaled(model, scales):
            full = full_logits(model, examples, PAD)
            wrong = wrong_cache.logits([0, 1, 2])
            right = right_cache.logits([0, 1, 2])
    torch.testing.assert_close(right, full, rtol=0, atol=1e-5)
    assert (wrong - full).abs().max() > 1e-3


SLIDING = {  # window 4 < the prefixes, with full-attention layers mixed in where the architecture has them
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**DIMS, sliding_window=4)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**DIMS, sliding_window=4)),
    # eager applies the attention logit soft-capping that sdpa ignores: the cached path must follow
    "gemma2_eager": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**DIMS, sliding_window=4,
                                                                 attn_logit_softcapping=1.0,
                                                                 attn_implementation="eager")),
    "gemma3_text": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        **DIMS, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "olmo3": lambda: tf.Olmo3ForCausalLM(tf.Olmo3Config(
        **DIMS, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
}


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_kv_reuse_with_a_sliding_window_shorter_than_the_prefix(arch: str) -> None:
    """Sliding layers cache only their last window-1 positions; the padded batch must still line up."""
    torch.manual_seed(0)
    model = SLIDING[arch]().float().eval()
    examples = _examples([3, 12, 7, 17, 2])
    cache = PrefixCache(model, examples, PAD, batch_size=2)
    masks = {k: m.detach() for k, m in _random_masks(model).items()}
    with torch.no_grad(), scaled(model, {k: 2 * m for k, m in masks.items()}):
        full = full_logits(model, examples, PAD)
        reuse = cache.logits([3, 0, 4, 1, 2])
    torch.testing.assert_close(reuse, full[[3, 0, 4, 1, 2]], rtol=0, atol=1e-5)
    assert model.config._attn_implementation == ("eager" if arch == "gemma2_eager" else "sdpa")  # restored
    with torch.no_grad():  # the window matters: without it the logits differ
        model.config.sliding_window = 4096
        for layer in model.model.layers:
            if getattr(layer.self_attn, "sliding_window", None):
                layer.self_attn.sliding_window = 4096
        unwindowed = full_logits(model, examples, PAD)
    assert (unwindowed - full).abs().max() > 1e-3


def _shared_examples(shared: int, suffixes: list[int], seed: int = 0) -> list[Example]:
    """One prompt of ``shared`` tokens, then each example's own ``suffixes[i]`` tokens and its last token
    (suffix 0: the prefix minus its last token is exactly the shared prompt)."""
    rng = random.Random(seed)
    prompt = [rng.randrange(1, DIMS["vocab_size"]) for _ in range(shared)]
    out = []
    for n in suffixes:
        own = [rng.randrange(1, DIMS["vocab_size"]) for _ in range(n + 1)]
        out.append(Example(prompt + own, *rng.sample(range(1, DIMS["vocab_size"]), 2)))
    return out


@pytest.mark.parametrize(("dtype", "grad_rtol"), [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_shared_prompt_kv_equals_full_recompute_and_holds_the_prompt_once(dtype: torch.dtype,
                                                                          grad_rtol: float) -> None:
    """The few-shot prompt all prefixes share is cached once; each example keeps only its own part.
    Logits and mask gradients still equal the full recompute."""
    model = _model().to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    examples = _shared_examples(70, [9, 0, 25, 3, 14, 1, 30])
    cache = PrefixCache(model, examples, PAD, batch_size=3)  # three suffix chunks, right-padded
    assert cache.shared_length == 70 and cache.shared is not None
    per_example = PrefixCache(model, examples, PAD, batch_size=3, share_min=10_000)
    assert per_example.shared_length == 0
    # the prompt is stored once instead of 7 times: bytes = (70 + sum of own parts) vs (7 * 70 + ...)
    own = sum(len(e.ids) - 1 - 70 for e in examples)
    assert cache.stored_bytes() * (7 * 70 + own) == per_example.stored_bytes() * (70 + own)
    masks = {k: m.detach().to(dtype).requires_grad_(True) for k, m in _random_masks(model).items()}
    for idx in ([6, 1, 3, 0], [2, 5], [1], list(range(7))):
        batch = [examples[i] for i in idx]
        full, g_full = _loss_and_grads(model, masks, lambda b=batch: full_logits(model, b, PAD), batch)
        shared, g_shared = _loss_and_grads(model, masks, lambda i=idx: cache.logits(i), batch)
        torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
        for kind in KINDS:
            assert g_full[kind].abs().sum() > 0, kind
            rel = ((g_shared[kind] - g_full[kind]).norm() / g_full[kind].norm()).item()
            assert rel < grad_rtol, (kind, rel)


@pytest.mark.parametrize(("window", "shared_length"), [(128, 70), (40, 0)])
def test_shared_prompt_with_sliding_window_layers(window: int, shared_length: int) -> None:
    """A window longer than every prefix keeps the whole prompt, so it is shared; a shorter one would
    cut it, so each example keeps its own (windowed) KV. Both equal the full recompute."""
    torch.manual_seed(0)
    model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**DIMS, sliding_window=window)).float().eval()
    examples = _shared_examples(70, [9, 0, 25, 3])
    cache = PrefixCache(model, examples, PAD, batch_size=2)
    assert cache.shared_length == shared_length
    masks = {k: m.detach() for k, m in _random_masks(model).items()}
    with torch.no_grad(), scaled(model, {k: 2 * m for k, m in masks.items()}):
        full = full_logits(model, examples, PAD)
        reuse = cache.logits([3, 0, 2, 1])
    torch.testing.assert_close(reuse, full[[3, 0, 2, 1]], rtol=0, atol=1e-5)


def test_prefix_cache_rejects_one_token_prefixes() -> None:
    with pytest.raises(ValueError, match="at least 2 tokens"):
        PrefixCache(_model(), [Example([5], 1, 2)], PAD)


# ---------------------------------------------------------------- logit difference


def test_logit_difference_gathers_per_example() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 30, generator=gen)
    examples = [Example([1, 2], d, u) for d, u in ((3, 7), (0, 29), (12, 12), (8, 1), (20, 4))]
    got = logit_difference(logits, examples)
    manual = torch.stack([logits[i, e.desired] - logits[i, e.undesired] for i, e in enumerate(examples)])
    assert got.shape == (5,)
    torch.testing.assert_close(got, manual, rtol=0, atol=0)
    # the reference bug: a B x B matrix logits[:, desired] - logits[:, undesired]; its mean differs here
    wrong = logits[:, [e.desired for e in examples]] - logits[:, [e.undesired for e in examples]]
    assert wrong.shape == (5, 5) and not torch.isclose(wrong.mean(), got.mean())


# ---------------------------------------------------------------- learn_mask

TRAIN = dict(lr=0.05, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def train_examples() -> list[Example]:
    return _examples([random.Random(n).randrange(3, 12) for n in range(16)], seed=3)


def test_learn_mask_loss_goes_down_and_masks_stay_in_unit_interval(train_examples, monkeypatch) -> None:
    seen: list[torch.Tensor] = []  # every step's scales 2m, as the forward pass received them

    def recording(model, scales, *args, **kwargs):
        seen.append(torch.cat([s.detach().flatten() for s in scales.values()]))
        return scaled(model, scales, *args, **kwargs)

    monkeypatch.setattr(dcm_train, "scaled", recording)
    model = _model()
    result = learn_mask(model, train_examples, PAD, lam=0.01, epochs=8, **TRAIN)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.1, losses
    assert len(seen) == 4 * result.epochs_run
    steps = torch.stack(seen)
    assert steps.min() == 0.0 and steps.max() == 2.0  # clamped during training, and some hit each bound
    for kind, m in result.masks.items():
        assert m.shape == component_space(model).shape(kind)
        assert m.min() >= 0.0 and m.max() <= 1.0
        assert (m < 1.0).any()  # something moved


def test_larger_lambda_selects_fewer_components(train_examples) -> None:
    small = learn_mask(_model(), train_examples, PAD, lam=0.002, epochs=8, **TRAIN)
    large = learn_mask(_model(), train_examples, PAD, lam=0.05, epochs=8, **TRAIN)
    n_small = small.summary()["components_selected"]
    n_large = large.summary()["components_selected"]
    assert 0 < n_large < n_small, (n_large, n_small)


def test_huge_lambda_raises_with_advice(train_examples) -> None:
    with pytest.raises(DCMError, match="lower dcm.lambda"):
        learn_mask(_model(), train_examples, PAD, lam=1e4, epochs=10, **TRAIN)


def test_summary_counts_add_up(train_examples) -> None:
    model = _model()
    summary = learn_mask(model, train_examples, PAD, lam=0.01, epochs=4, **TRAIN).summary()
    space = component_space(model)
    n = summary["components_selected"]
    assert 0 < n < space.total
    assert summary["components_total"] == space.total
    assert n == sum(summary["selected_per_kind"].values())
    assert n == sum(sum(per_layer) for per_layer in summary["selected_per_layer"].values())
    assert all(len(v) == space.n_layers for v in summary["selected_per_layer"].values())
    assert summary["components_fraction"] == pytest.approx(n / space.total)
    assert summary["history"][-1]["selected"] == n


def test_early_stop_when_the_count_settles(train_examples) -> None:
    result = learn_mask(_model(), train_examples, PAD, lam=0.01, epochs=50, **TRAIN)
    assert result.stopped_early and result.epochs_run < 50
    assert len(result.history) == result.epochs_run
    assert result.history[-1]["selected"] < component_space(_model()).total


def test_no_early_stop_at_the_full_count(train_examples) -> None:
    model = _model()
    result = learn_mask(model, train_examples, PAD, lam=0.0, epochs=4, lr=1e-5, batch_size=4, progress=False)
    assert not result.stopped_early and result.epochs_run == 4
    assert result.summary()["components_selected"] == component_space(model).total


def test_kv_reuse_and_full_recompute_learn_the_same_mask(train_examples) -> None:
    a = learn_mask(_model(), train_examples, PAD, lam=0.01, epochs=2, kv_reuse=True, **TRAIN)
    b = learn_mask(_model(), train_examples, PAD, lam=0.01, epochs=2, kv_reuse=False, **TRAIN)
    for kind in KINDS:
        torch.testing.assert_close(a.masks[kind], b.masks[kind], rtol=0, atol=1e-4)


def test_nan_model_raises(train_examples) -> None:
    model = _model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    with pytest.raises(DCMError, match="loss is nan"):
        learn_mask(model, train_examples, PAD, lam=0.01, epochs=2, **TRAIN)


def test_no_examples_raises() -> None:
    with pytest.raises(DCMError, match="no localisation examples"):
        learn_mask(_model(), [], PAD)
