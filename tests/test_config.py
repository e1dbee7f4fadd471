"""The typed config: shipped files validate; every kind of bad field names file, field, values."""

from __future__ import annotations

from pathlib import Path

import pytest

from cca_ray.config import CCAConfig, ConfigError, dump_config, load_config, parse_config

TUNE_CONFIGS = Path(__file__).resolve().parents[1] / "tune_configs"


@pytest.mark.parametrize("path", sorted(TUNE_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert isinstance(load_config(path), CCAConfig)


def test_defaults_are_the_method_doc_numbers():
    c = CCAConfig()
    assert (c.dcm.lr, c.dcm.epochs, c.dcm.batch_size, c.dcm.lr_step_epochs, c.dcm.lr_gamma) == (
        5e-3, 50, 8, 5, 0.9)
    assert c.data.split_ratios == (0.52, 0.08, 0.40) and c.data.template_threshold == 0.8
    assert c.data.n_shots == 8 and c.update.optimizer == "sgd" and c.sampling.n_samples == 10


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("dcm:\n  lamda: 0.1\n", ["dcm.lamda: unknown key", "allowed keys here:", "lambda"]),
        ("dcm:\n  lambda: -1\n", ["dcm.lambda", "greater than or equal to 0", "(got -1)"]),
        ("update:\n  steps: many\n", ["update.steps", "valid integer", "'many'"]),
        ("sampling:\n  backend: tgi\n", ["sampling.backend", "'hf' or 'vllm'", "'tgi'"]),
        ("data:\n  n_shots: 9\n", ["data.n_shots", "less than or equal to 8"]),
        ("data:\n  split_ratios: [0.5, 0.5, 0.5]\n", ["data", "summing to 1"]),
        ("localize:\n  method: guess\n", ["localize.method", "'branching-bisect'"]),
        ("modle: {}\n", ["modle: unknown key", "model"]),
        ("- a list\n", ["top level must be a mapping"]),
        ("dcm: [1\n", ["not valid YAML"]),
    ],
)
def test_bad_configs_name_file_field_and_allowed_values(tmp_path, yaml_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message


def test_dump_round_trips_with_aliases():
    config = parse_config({"dcm": {"lambda": 0.02}})
    text = dump_config(config)
    assert "lambda: 0.02" in text
    import yaml

    assert parse_config(yaml.safe_load(text)) == config
