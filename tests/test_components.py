"""The adapter table on tiny random models of every supported architecture: counts, weight rows and
scaling hooks, checked against what actually reaches attention (post-norm, post-RoPE) and down_proj."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import pytest
import torch
import transformers as tf

from cca_ray.components import (
    ADAPTERS,
    KINDS,
    ComponentSpace,
    UnsupportedArchitecture,
    adapter_for,
    component_space,
    param_name_rows,
    scaled,
    weight_rows,
)

DIMS = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=100,
    initializer_range=0.2,  # large enough that one component visibly moves the logits
)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)


def _gemma3_multimodal() -> tf.PreTrainedModel:
    config = tf.Gemma3Config(
        text_config=tf.Gemma3TextConfig(**DIMS),
        vision_config=tf.SiglipVisionConfig(**TINY_VISION),
        mm_tokens_per_image=4,
    )
    return tf.Gemma3ForConditionalGeneration(config)


BUILDERS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**DIMS)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**DIMS)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**DIMS)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**DIMS)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**DIMS)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**DIMS)),
    "gemma3_text": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**DIMS)),
    "gemma3": _gemma3_multimodal,
    "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**DIMS)),
    "olmo3": lambda: tf.Olmo3ForCausalLM(tf.Olmo3Config(**DIMS)),
}
ARCHS = sorted(BUILDERS)
# Where a full-width q/k norm mixes heads, perturbing one head's rows moves every head after the norm.
NORM_MIXES_HEADS = {("olmo2", "q"), ("olmo2", "k"), ("olmo3", "q"), ("olmo3", "k")}
LAYER = 0  # target layer: its other components see the same input, so they must stay bit-identical
INPUT = torch.tensor([[5, 17, 42, 8, 99, 3], [61, 2, 7, 33, 14, 50]])


@cache
def _model(arch: str) -> tf.PreTrainedModel:
    torch.manual_seed(0)
    model = BUILDERS[arch]().float().eval()
    model.set_attn_implementation("eager")
    return model


def _index(space: ComponentSpace, kind: str) -> int:
    return space.count(kind) - 1  # the last one, so an off-by-one slice shows up


def _ones(space: ComponentSpace, kinds=KINDS) -> dict[str, torch.Tensor]:
    return {k: torch.ones(space.shape(k)) for k in kinds}


def _text_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_submodule(adapter_for(model).layers.rsplit(".", 1)[0])


@contextmanager
def _capture(model: torch.nn.Module) -> Iterator[dict[tuple[int, str], torch.Tensor]]:
    """Record per layer what attention receives (query [b, H, s, d], key/value [b, KV, s, d]: after
    norms and RoPE, independent of the adapter table) and down_proj's input [b, s, d_ff]."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    layers = _text_model(model).layers
    module = sys.modules[type(layers[0].self_attn).__module__]
    original = module.eager_attention_forward

    def spy(attn, query, key, value, *args, **kwargs):
        for kind, t in (("q", query), ("k", key), ("v", value)):
            seen[(attn.layer_idx, kind)] = t.detach().clone()
        return original(attn, query, key, value, *args, **kwargs)

    handles = [
        layer.mlp.down_proj.register_forward_hook(
            lambda _m, args, _out, i=i: seen.__setitem__((i, "mlp"), args[0].detach().clone())
        )
        for i, layer in enumerate(layers)
    ]
    module.eager_attention_forward = spy
    try:
        yield seen
    finally:
        module.eager_attention_forward = original
        for h in handles:
            h.remove()


def _units(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Captured activation as [b, components, s, unit] (mlp: [b, s, d_ff] -> [b, d_ff, s, 1])."""
    return t.transpose(1, 2).unsqueeze(-1) if kind == "mlp" else t


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_scaling_one_component_moves_only_its_slice_at_last_position(arch: str, kind: str) -> None:
    model = _model(arch)
    space = component_space(model)
    idx = _index(space, kind)
    scales = _ones(space)
    scales[kind][LAYER, idx] = 3.0
    with torch.no_grad(), _capture(model) as base:
        model(INPUT)
    with torch.no_grad(), _capture(model) as got, scaled(model, scales):
        model(INPUT)
    expected = _units(base[(LAYER, kind)], kind).clone()
    expected[:, idx, -1] *= 3.0
    torch.testing.assert_close(_units(got[(LAYER, kind)], kind), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got[(LAYER, kind)], base[(LAYER, kind)])
    for key in base:  # causal: nothing before the last position moves, in any layer
        torch.testing.assert_close(got[key][..., :-1, :], base[key][..., :-1, :], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_all_positions_when_not_last_only(kind: str) -> None:
    model = _model("qwen3")
    space = component_space(model)
    scales = _ones(space, [kind])
    scales[kind][LAYER, 0] = 0.5
    with torch.no_grad(), _capture(model) as base:
        model(INPUT)
    with torch.no_grad(), _capture(model) as got, scaled(model, scales, last_position_only=False):
        model(INPUT)
    expected = _units(base[(LAYER, kind)], kind).clone()
    expected[:, 0] *= 0.5
    torch.testing.assert_close(_units(got[(LAYER, kind)], kind), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_scales_leave_logits_and_remove_hooks(arch: str) -> None:
    model = _model(arch)
    space = component_space(model)
    hooks_before = _hook_count(model)
    with torch.no_grad():
        base = model(INPUT).logits
        with scaled(model, _ones(space)):
            assert _hook_count(model) == hooks_before + len(KINDS) * space.n_layers
            same = model(INPUT).logits
    assert torch.equal(same, base)
    assert _hook_count(model) == hooks_before


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_ablating_one_component_changes_last_logits(arch: str, kind: str) -> None:
    model = _model(arch)
    space = component_space(model)
    scales = _ones(space, [kind])
    scales[kind][LAYER, _index(space, kind)] = 0.0
    with torch.no_grad():
        base = model(INPUT).logits
        with scaled(model, scales):
            ablated = model(INPUT).logits
    assert (ablated[:, -1] - base[:, -1]).abs().max() > 1e-4
    torch.testing.assert_close(ablated[:, :-1], base[:, :-1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_weight_rows_produce_exactly_that_component(arch: str, kind: str) -> None:
    model = _model(arch)
    space = component_space(model)
    idx = _index(space, kind)
    linear, rows = weight_rows(model, space, LAYER, kind, idx)
    name, name_rows = param_name_rows(model, space, LAYER, kind, idx)
    assert dict(model.named_parameters())[name] is linear.weight and name_rows == rows
    assert rows.stop - rows.start == space.unit(kind) and rows.stop == linear.out_features

    outputs: list[torch.Tensor] = []
    handle = linear.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach().clone()))
    original = linear.weight.detach().clone()
    try:
        with torch.no_grad(), _capture(model) as base:
            model(INPUT)
        with torch.no_grad():
            linear.weight[rows] += torch.randn_like(linear.weight[rows])
        with torch.no_grad(), _capture(model) as got:
            model(INPUT)
    finally:
        handle.remove()
        with torch.no_grad():
            linear.weight.copy_(original)
    if (arch, kind) in NORM_MIXES_HEADS:  # check the projection's own output instead
        before, after = (o.unflatten(-1, (-1, space.head_dim)).transpose(1, 2) for o in outputs)
    else:
        before, after = _units(base[(LAYER, kind)], kind), _units(got[(LAYER, kind)], kind)
    changed = (after - before).abs().amax(dim=(0, 2, 3)) > 0  # per component, over batch/positions/width
    assert changed.nonzero().flatten().tolist() == [idx]
    assert ((after - before)[:, idx].abs().amax(dim=-1) > 0).all()  # at every position


@pytest.mark.parametrize("arch", ARCHS)
def test_component_space_counts(arch: str) -> None:
    space = component_space(_model(arch))
    assert (space.n_layers, space.n_heads, space.n_kv_heads, space.head_dim, space.d_ff) == (2, 4, 2, 16, 96)
    assert [space.count(k) for k in KINDS] == [4, 2, 2, 96]
    assert space.shape("k") == (2, 2) and space.shape("mlp") == (2, 96)
    assert space.total == 2 * (4 + 2 * 2 + 96)
    assert space.model_type == adapter_for(_model(arch)).model_type


def test_component_space_without_gqa_or_head_dim() -> None:
    dims = {k: v for k, v in DIMS.items() if k not in ("num_key_value_heads", "head_dim")}
    space = component_space(tf.LlamaForCausalLM(tf.LlamaConfig(**dims)))
    assert (space.n_heads, space.n_kv_heads, space.head_dim) == (4, 4, 64 // 4)
    assert space.total == 2 * (4 + 8 + 96)


def test_every_table_row_is_tested() -> None:
    assert set(ADAPTERS) == set(BUILDERS)


def test_unsupported_architecture_is_named_with_the_supported_list() -> None:
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(UnsupportedArchitecture, match="gpt2") as err:
        component_space(gpt2)
    message = str(err.value)
    assert all(t in message for t in ADAPTERS) and "add a row" in message
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        with scaled(gpt2, {}):
            pytest.fail("entered the block for an unsupported model")
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        adapter_for(_model("llama"), architecture="gpt2")
    assert isinstance(err.value, ValueError)


def test_bad_scales_are_rejected_before_any_hook() -> None:
    model = _model("llama")
    space = component_space(model)
    hooks = _hook_count(model)
    with pytest.raises(ValueError, match="shape"):
        with scaled(model, {"q": torch.ones(space.n_layers, space.n_kv_heads)}):
            pass
    with pytest.raises(ValueError, match="unknown kind"):
        with scaled(model, {"o": torch.ones(2, 4)}):
            pass
    with pytest.raises(IndexError):
        weight_rows(model, space, 0, "k", space.n_kv_heads)
    assert _hook_count(model) == hooks


def test_hooks_removed_on_exception() -> None:
    model = _model("olmo2")
    hooks = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with scaled(model, _ones(component_space(model))):
            raise RuntimeError("boom")
    assert _hook_count(model) == hooks


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_scale_tensor(arch: str) -> None:
    model = _model(arch)
    space = component_space(model)
    scales = {k: torch.ones(space.shape(k), requires_grad=True) for k in KINDS}
    with scaled(model, scales):
        logits = model(INPUT).logits
    (logits[:, -1, 7] - logits[:, -1, 3]).sum().backward()
    for kind, s in scales.items():
        assert s.grad is not None and torch.isfinite(s.grad).all()
        assert (s.grad.abs().sum(dim=1) > 0).all(), f"{kind}: a layer got no gradient"


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_last_token_matches_full_recompute(arch: str) -> None:
    model = _model(arch)
    space = component_space(model)
    gen = torch.Generator().manual_seed(1)
    scales = {k: 2 * torch.rand(space.shape(k), generator=gen) for k in KINDS}
    with torch.no_grad():
        with scaled(model, scales):
            full = model(INPUT, use_cache=False).logits[:, -1]
        past = model(INPUT[:, :-1], use_cache=True).past_key_values
        with scaled(model, scales):
            step = model(INPUT[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
        plain = model(INPUT, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
    assert (full - plain).abs().max() > 1e-3  # the scales did something
