"""The Ray actors on a real local Ray: the shared SamplerActor (vLLM's CPU build) keeps each
client's weights apart, and the TrainerActor's DeepSpeed ZeRO-2 update matches the plain one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file
from test_pipeline import _config

from cca_ray.config import parse_config
from cca_ray.pipeline.run import Pipeline

pytestmark = pytest.mark.slow


def test_sampler_actor_keeps_each_clients_weights(local_ray, small_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.sampler import SamplerActor, SamplerClient
    from cca_ray.sampling import make_sampler

    prompts = [f"Q: What is {a} plus {b}?\nA:" for a, b in ((3, 4), (12, 9), (7, 7), (20, 5))]
    tok = AutoTokenizer.from_pretrained(small_model)
    model = AutoModelForCausalLM.from_pretrained(small_model).eval()
    hf = make_sampler("hf", model=model, tokenizer=tok, max_new_tokens=16, progress=False)
    base_hf = [o[0].token_ids for o in hf.generate(prompts)]

    actor = SamplerActor.options(num_cpus=0.5).remote("vllm", str(small_model), "float32", 16, 16, 512)
    a, b = SamplerClient(actor), SamplerClient(actor)
    base = [o[0].token_ids for o in a.generate(prompts)]
    assert base == base_hf  # vLLM in the actor == HF greedy

    params = dict(model.named_parameters())
    changed = {n: params[n].detach() * 0 for n in params if n.endswith("mlp.up_proj.weight")}
    a.push_weights(changed)  # client a: every MLP neuron switched off
    with torch.no_grad():
        for n, w in changed.items():
            params[n].copy_(w)
    changed_hf = [o[0].token_ids for o in hf.generate(prompts)]
    assert changed_hf != base_hf
    assert [o[0].token_ids for o in a.generate(prompts)] == changed_hf
    assert [o[0].token_ids for o in b.generate(prompts)] == base  # b never pushed: the checkpoint
    assert [o[0].token_ids for o in a.generate(prompts)] == changed_hf  # a's weights again
    loads = ray.get(actor.stats.remote())["loads"]
    a.generate(prompts)
    assert ray.get(actor.stats.remote())["loads"] == loads  # unchanged state: nothing reloaded

    # every parameter (norms, embeddings, o/down projections too), as a full fine-tune changes them
    g = torch.Generator().manual_seed(0)
    noisy = {n: (w.detach() + 0.02 * w.detach().abs().mean() * torch.randn(w.shape, generator=g))
             for n, w in params.items()}
    c = SamplerClient(actor)
    c.push_weights(noisy)
    with torch.no_grad():
        for n, w in noisy.items():
            params[n].copy_(w)
    noisy_hf = [o[0].token_ids for o in hf.generate(prompts)]
    assert noisy_hf != base_hf
    assert [o[0].token_ids for o in c.generate(prompts)] == noisy_hf
    assert [o[0].token_ids for o in b.generate(prompts)] == base  # and back to the checkpoint

    ray.get(actor.close.remote())
    ray.kill(actor)


def test_sampler_engine_gives_each_client_the_checkpoint_plus_its_own_rows(local_ray, small_model):
    """Row updates (what CCA trials push) of two clients on the same weights, and a LoRA product of a
    third: after each switch the engine's weights are exactly the checkpoint plus that client's update."""
    from actors.sampler import SamplerClient, SamplerEngine
    from cca_ray.io import checkpoint_reader
    from cca_ray.sampling.weights import LowRank, Rows, materialise

    engine = SamplerEngine("hf", str(small_model), max_new_tokens=4)
    params = dict(engine.sampler.model.named_parameters())
    read = checkpoint_reader(small_model)
    names = [n for n in params if n.endswith(("mlp.up_proj.weight", "self_attn.q_proj.weight"))]
    g = torch.Generator().manual_seed(0)

    def rows(index: list[int]) -> dict:
        return {n: Rows(torch.tensor(index), torch.randn(len(index), params[n].shape[1], generator=g))
                for n in names}

    updates = {"d": rows([0, 1, 2, 3, 10]), "e": rows([2, 3, 4, 20]),
               "f": {n: LowRank(torch.randn(2, params[n].shape[1], generator=g),
                                torch.randn(params[n].shape[0], 2, generator=g), 0.5) for n in names[:2]}}
    for key in ("d", "e", "f", "d", None):
        update = updates[key] if key else {}
        engine.ensure((key, 0) if key else None, [ray.put(update)] if key else [None])
        for n in params:
            want = materialise(update.get(n), read(n))
            assert torch.equal(params[n].detach(), want.to(params[n].dtype)), (key, n)
    assert engine.loaded == set()

    # a client that pushes rows, then other rows of the same weight, holds both (the later win)
    client = SamplerClient(None)
    client.push_weights(updates["d"])
    client.push_weights(updates["e"])
    held = client.weights[names[0]]
    assert sorted(held.index.tolist()) == [0, 1, 2, 3, 4, 10, 20]
    at = held.index.tolist().index(2)
    assert torch.equal(held.values[at], updates["e"][names[0]].values[0])  # row 2: e's value
    client.push_weights(dict.fromkeys(names))  # None: back to the checkpoint's
    assert client.weights == {}


def test_trainer_actor_zero2_update_matches_plain_update(local_ray, small_model, problems_file, tmp_path):
    from actors.trainer import TrainerActor

    update = {"lr_grid": [], "lr": 0.05, "random_seeds": 0, "steps": 4, "kinds": ["v", "mlp"],
              "zero_stage": 2}
    raw = _config(small_model, problems_file, update=update)
    out = tmp_path / "out"
    trainer = TrainerActor.options(num_cpus=0.5).remote(raw, str(out), None)
    events = [ray.get(ref) for ref in trainer.update.remote()]
    ray.kill(trainer)
    assert [e["step"] for e in events if e["kind"] == "validation"] == [0, 2, 4]
    zero_run = events[-1]
    assert events[-1]["kind"] == "final"

    plain_config = parse_config(raw | {"update": raw["update"] | {"zero_stage": None}})
    plain = Pipeline(plain_config, out, progress=False)
    prep = plain.prepare()
    mask = plain.dcm(prep)
    assert plain.store.computed == []  # data .. dcm were the trainer's: reused
    run = plain.method_run("cca", 0.05, prep, mask)
    assert run["path"] != zero_run["path"]  # a separate artifact (zero_stage is part of the key)

    def history(r):
        return [h.get("val_accuracy") for h in json.loads((Path(r["path"]) / "history.json").read_text())]

    assert history(run) == history(zero_run)
    zero_rows = load_file(str(Path(zero_run["path"]) / "rows.safetensors"))
    plain_rows = load_file(str(Path(run["path"]) / "rows.safetensors"))
    assert zero_rows.keys() == plain_rows.keys() and all(torch.equal(zero_rows[k], plain_rows[k])
                                                         for k in zero_rows)
    assert zero_run["best_step"] == run["best_step"]
    # the new result fields alike: the best step >= 1 and the pivot diagnostics (train and held out)
    assert (zero_run["best_updated_step"], zero_run["best_updated_val"]) == (run["best_updated_step"],
                                                                              run["best_updated_val"])
    assert zero_run["best_updated_step"] >= 1
    assert zero_run["pivots"].keys() == run["pivots"].keys() == {"base", "best", "best_updated"}
    for state, sets in run["pivots"].items():
        for name, stats in sets.items():
            got = zero_run["pivots"][state][name]
            assert stats["n"] == got["n"] > 0 and stats["base_wrong"] == got["base_wrong"]
            assert got["mean_logit_diff"] == pytest.approx(stats["mean_logit_diff"], abs=1e-4)
            assert (got["desired_wins"], got["flip_rate"]) == (stats["desired_wins"], stats["flip_rate"])
    zu = load_file(str(Path(zero_run["path"]) / "best_updated_deltas.safetensors"))
    pu = load_file(str(Path(run["path"]) / "best_updated_deltas.safetensors"))
    assert zu.keys() == pu.keys() and max((zu[k] - pu[k]).abs().max().item() for k in zu) <= 1e-6
    # the rows after the last step (4 SGD steps under ZeRO-2 in the actor vs in-process hooks)
    zd = load_file(str(Path(zero_run["path"]) / "last_deltas.safetensors"))
    pd = load_file(str(Path(run["path"]) / "last_deltas.safetensors"))
    assert zd.keys() == pd.keys()
    assert min(pd[k].abs().max().item() for k in pd) > 1e-4  # the rows really moved
    diff = max((zd[k] - pd[k]).abs().max().item() for k in zd)
    assert diff <= 1e-6, diff  # float32 order of operations: (W + D) x vs W x + D x
