"""vLLM-CPU after a weight push scores with the pushed output head: a LARGE change to a tied
embedding (and to an untied embedding and lm_head) gives HF's greedy ids and token logprobs, and
pushing the checkpoint's weights back gives the checkpoint's again. The real engine, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cca_ray.data.prompts import build_prompt
from cca_ray.sampling import HFSampler

pytestmark = pytest.mark.slow

QUESTIONS = ("Ana has 5 apples. She buys 3 more apples.", "A box holds 6 pencils.",
             "The first box has 4 oranges.", "Tom reads 12 pages a day for 3 days.")
MAX_NEW = 16
LOGPROB_ATOL = 1e-3  # float32, vLLM-CPU kernels against HF matmuls (measured max gap 7e-5)

SCRIPT = textwrap.dedent("""
    import json, sys
    from safetensors.torch import load_file
    from cca_ray.sampling.vllm_backend import VLLMSampler

    if __name__ == "__main__":
        job = json.loads(sys.argv[1])
        result = {}
        for name, model in job["models"].items():
            sampler = VLLMSampler(model["path"], max_new_tokens=job["max_new"], progress=False,
                                  max_model_len=256)

            def probe():
                greedy = [o[0].token_ids for o in sampler.generate_ids(job["prompts"])]
                sequences = [p + g for p, g in zip(job["prompts"], greedy)]
                return {"greedy": greedy, "sequences": sequences,
                        "logprobs": sampler.token_logprobs(sequences)}

            rows = {"base": probe()}
            sampler.push_weights(load_file(model["changed"]))
            rows["changed"] = probe()
            sampler.push_weights(load_file(model["restore"]))
            rows["restored"] = probe()
            result[name] = rows
            sampler.close()
        print("RESULT" + json.dumps(result))
""")


@pytest.fixture(scope="module")
def tokenizer():
    from cca_ray.tiny.tokenizer import train_tokenizer

    return train_tokenizer([build_prompt(q, 2) for q in QUESTIONS])


def tiny_llama(tokenizer, out: Path, tied: bool = False):
    """A random tiny Llama with sharp logits, saved with the tokenizer to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32,  # vLLM-CPU needs >= 32
                         max_position_embeddings=256, tie_word_embeddings=tied, initializer_range=0.3,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def make_model(tokenizer, out: Path, tied: bool) -> dict[str, str]:
    """A random tiny Llama (sharp logits) saved to out, and two weight files beside it: its
    embedding (and untied lm_head) with large noise added, and the same names as saved."""
    from safetensors.torch import save_file

    model = tiny_llama(tokenizer, out, tied)
    names = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    g = torch.Generator().manual_seed(1)
    base = {n: model.get_parameter(n).detach().clone() for n in names}
    changed = {n: w + 3 * w.std() * torch.randn(w.shape, generator=g) for n, w in base.items()}
    save_file(changed, out / "changed.safetensors")
    save_file(base, out / "restore.safetensors")
    return {"path": str(out), "changed": str(out / "changed.safetensors"),
            "restore": str(out / "restore.safetensors")}


@pytest.fixture(scope="module")
def engine_run(tokenizer, tmp_path_factory) -> tuple[dict, dict, list[list[int]], float]:
    """The models, and what vLLM gave on each before, after and undoing the push."""
    pytest.importorskip("vllm", reason="needs the cpu-vllm (or gpu) extra")
    root = tmp_path_factory.mktemp("tied")
    models = {name: make_model(tokenizer, root / name, tied=name == "tied") for name in ("tied", "untied")}
    prompts = [tokenizer(build_prompt(q, 0), add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    script = root / "vllm_push.py"
    script.write_text(SCRIPT)
    job = {"models": models, "prompts": prompts, "max_new": MAX_NEW}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), json.dumps(job)], capture_output=True, text=True,
                          timeout=900)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return models, json.loads(line[len("RESULT"):]), prompts, seconds


def hf_probe(model, tokenizer, prompts: list[list[int]], sequences: list[list[int]]) -> dict:
    """HF's greedy ids (the same cut as vLLM's) and its logprob of each token of the sequences."""
    hf = HFSampler(model, tokenizer, batch_size=len(prompts), max_new_tokens=MAX_NEW, progress=False)
    greedy = [o[0].token_ids for o in hf.generate_ids(prompts)]
    logprobs = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            logprobs.append(lp.gather(1, ids[0, 1:, None])[:, 0].tolist())
    return {"greedy": greedy, "logprobs": logprobs}


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_pushed_embedding_and_head_reach_vllms_logits(engine_run, tokenizer, name):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    models, result, prompts, seconds = engine_run
    print(f"vLLM start, 3 probes and 2 pushes of both models: {seconds:.1f}s")
    model = AutoModelForCausalLM.from_pretrained(models[name]["path"], dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings == (name == "tied")
    assert model.config.vocab_size % 64 != 0  # vLLM pads the vocabulary: the padded rows are exercised
    got = result[name]
    base = hf_probe(model, tokenizer, prompts, got["base"]["sequences"])
    assert got["base"]["greedy"] == base["greedy"]
    assert max_gap(got["base"]["logprobs"], base["logprobs"]) < LOGPROB_ATOL

    with torch.no_grad():
        for n, w in load_file(models[name]["changed"]).items():
            model.get_parameter(n).copy_(w)
    if name == "tied":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    changed = hf_probe(model, tokenizer, prompts, got["changed"]["sequences"])
    assert changed["greedy"] != base["greedy"]  # the change is large: greedy text moves
    moved = hf_probe(model, tokenizer, prompts, got["base"]["sequences"])
    assert max_gap(moved["logprobs"], base["logprobs"]) > 1.0  # and logprobs move by nats
    gap = max_gap(got["changed"]["logprobs"], changed["logprobs"])
    print(f"{name}: vLLM vs HF after the push, max |logprob gap| {gap:.2e}")
    assert got["changed"]["greedy"] == changed["greedy"]
    assert gap < LOGPROB_ATOL

    assert got["restored"]["greedy"] == base["greedy"]  # the checkpoint's weights pushed back
    model = AutoModelForCausalLM.from_pretrained(models[name]["path"], dtype=torch.float32).eval()
    restored = hf_probe(model, tokenizer, prompts, got["restored"]["sequences"])
    assert max_gap(got["restored"]["logprobs"], restored["logprobs"]) < LOGPROB_ATOL
