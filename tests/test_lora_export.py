"""The sparse CCA delta as a peft LoRA adapter: peft loads it onto the base model, and the merged
model equals the model `apply-delta` rebuilds (and so `cca_model/`) to float tolerance. The delta
moves whole rows by the weights' own scale, so a wrong row, a transposed factor or a scale other
than 1 shows at once."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cca_ray.cli import main
from cca_ray.io import checkpoint_reader
from cca_ray.update import save_delta


@pytest.fixture(scope="module")
def delta_run(small_model, tmp_path_factory):
    """A run-like folder with a sparse delta over the small model: a few rows of q_proj, v_proj and
    up_proj in two layers moved by about one weight std, one row left unchanged."""
    read = checkpoint_reader(small_model)
    g = torch.Generator().manual_seed(0)
    rows, values = {}, {}
    for name, picked in (("model.layers.0.self_attn.q_proj.weight", [1, 5, 6]),
                         ("model.layers.1.self_attn.v_proj.weight", [0, 3]),
                         ("model.layers.1.mlp.up_proj.weight", [2, 9, 10, 11])):
        w = read(name)
        r = torch.tensor(picked)
        new = w[r] + w.std() * torch.randn(len(picked), w.shape[1], generator=g)
        if name.endswith("up_proj.weight"):
            new[0] = w[r[0]]  # an unchanged row: no rank for it
        rows[name], values[name] = r, new
    folder = tmp_path_factory.mktemp("delta_run")
    save_delta(rows, values, folder / "cca_delta.safetensors", base=str(small_model))
    return folder, rows, values


def test_the_adapter_merges_to_the_updated_model(delta_run, small_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, rows, values = delta_run
    assert main(["apply-delta", str(small_model), str(folder / "cca_delta.safetensors"),
                 str(tmp_path / "updated")]) == 0
    assert main(["export-lora", str(folder), str(tmp_path / "lora")]) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(small_model)
    assert config["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 3,
                                      "model.layers.1.self_attn.v_proj": 2, "model.layers.1.mlp.up_proj": 3}
    assert config["alpha_pattern"] == config["rank_pattern"]

    base = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, tmp_path / "lora").merge_and_unload().state_dict()
    updated = load_file(str(tmp_path / "updated" / "model.safetensors"))
    original = load_file(str(small_model / "model.safetensors"))
    for name, weight in updated.items():
        assert torch.allclose(merged[name], weight, atol=1e-6, rtol=0), name
        if name not in rows:
            assert torch.equal(merged[name], original[name]), name
    for name, r in rows.items():
        moved = (updated[name][r] - original[name][r]).abs().max().item()
        assert moved > 0.1 * original[name].std().item(), name  # the check can tell a missing change


def test_a_delta_without_a_base_or_a_change_is_a_clear_error(delta_run, small_model, tmp_path, capsys):
    folder, rows, _ = delta_run
    unchanged = {n: checkpoint_reader(small_model)(n)[r] for n, r in rows.items()}
    save_delta(rows, unchanged, tmp_path / "zero.safetensors", base=str(small_model))
    assert main(["export-lora", str(tmp_path / "zero.safetensors"), str(tmp_path / "out")]) == 2
    assert "changes no weight" in capsys.readouterr().err
    assert main(["export-lora", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no sparse delta here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
