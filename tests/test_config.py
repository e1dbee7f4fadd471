"""The typed config: shipped files validate; every kind of bad field names file, field, values."""

from __future__ import annotations

from pathlib import Path

import pytest

from cca_ray.config import CCAConfig, ConfigError, dump_config, load_config, load_sweep, parse_config

TUNE_CONFIGS = Path(__file__).resolve().parents[1] / "tune_configs"


CCA_CONFIGS = sorted(p for p in TUNE_CONFIGS.glob("*.yaml") if not p.name.startswith(("sweep", "circuits")))


@pytest.mark.parametrize("path", CCA_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert isinstance(load_config(path), CCAConfig)


def test_circuits_default_file_is_the_builtin_default_and_bad_fields_are_named(tmp_path):
    from cca_ray.circuits.config import CircuitsConfig, load_circuits_config

    assert load_circuits_config(TUNE_CONFIGS / "circuits-default.yaml") == CircuitsConfig()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 100, d_head: 16}\ntrain: {stepz: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_circuits_config(bad)
    text = str(err.value)
    assert "bad.yaml" in text and "train.stepz: unknown key" in text and "d_model (100)" in text


@pytest.mark.parametrize("path", sorted(TUNE_CONFIGS.glob("sweep*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_validate(path):
    sweep, configs = load_sweep(path)
    assert len(sweep.models) >= 2 and set(configs) == {m.key for m in sweep.models}


def test_real_sweep_names_the_six_models_with_reference_lambdas():
    _, configs = load_sweep(TUNE_CONFIGS / "sweep-real.yaml")
    names = {c.model.name for c in configs.values()}
    assert names == {"google/gemma-2-2b-it", "google/gemma-2-9b-it", "allenai/OLMo-2-1124-7B-Instruct",
                     "allenai/OLMo-2-1124-13B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
                     "Qwen/Qwen2.5-7B-Instruct"}
    for c in configs.values():
        assert c.tune.lambda_.low <= c.dcm.lambda_ <= c.tune.lambda_.high
        assert c.resources.trainer.num_gpus >= 1 and c.update.zero_stage == 2


def test_builtin_sweep_has_two_model_variants():
    _, configs = load_sweep(TUNE_CONFIGS / "sweep-default.yaml")
    assert [c.model.name for c in configs.values()] == ["builtin", "builtin"]
    assert len({c.model.builtin_steps for c in configs.values()}) == 2


@pytest.mark.parametrize(
    "text, expected",
    [("models: []\n", "models: List should have at least 1 item"),
     ("models:\n  - {key: a, config: default.yaml}\n  - {key: a, config: default.yaml}\n", "repeated: a"),
     ("models:\n  - {key: a, config: nope.yaml}\n", "no such file"),
     ("models:\n  - {key: a, config: default.yaml, overrides: {dcm: {lamda: 1}}}\n",
      "dcm.lamda: unknown key"),
     ("models:\n  - {key: 'a b', config: default.yaml}\n", "models.0.key")],
)
def test_bad_sweep_files_name_the_field(tmp_path, text, expected):
    (tmp_path / "default.yaml").write_text((TUNE_CONFIGS / "default.yaml").read_text())
    (tmp_path / "sweep.yaml").write_text(text)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        load_sweep(tmp_path / "sweep.yaml")


def test_defaults_are_the_method_doc_numbers():
    c = CCAConfig()
    assert (c.dcm.lr, c.dcm.epochs, c.dcm.batch_size, c.dcm.lr_step_epochs, c.dcm.lr_gamma) == (
        5e-3, 50, 8, 5, 0.9)
    assert c.data.split_ratios == (0.52, 0.08, 0.40) and c.data.template_threshold == 0.8
    assert c.data.n_shots == 8 and c.update.optimizer == "sgd" and c.sampling.n_samples == 10
    assert (c.localize.heldout_fraction, c.localize.heldout_seed) == (0.2, 0)  # held-out pivots: on


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
        ("localize:\n  heldout_fraction: 1.0\n", ["localize.heldout_fraction", "less than 1", "(got 1.0)"]),
        ("localize:\n  heldout_seed: -1\n", ["localize.heldout_seed", "greater than or equal to 0"]),
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


def test_integer_ranges_draw_whole_numbers_and_log_ranges_need_positive_bounds():
    from ray import tune

    from cca_ray.config import Range
    from cca_ray.ray_base import distribution

    seed = distribution(Range(low=0, high=3, log=False, integer=True))
    assert isinstance(seed, tune.search.sample.Integer)
    draws = {seed.sample() for _ in range(200)}
    assert draws == {0, 1, 2, 3}  # both bounds included
    with pytest.raises(ValueError, match="log range needs low > 0"):
        Range(low=0, high=3)
    with pytest.raises(ValueError, match="whole bounds"):
        Range(low=0.5, high=3, log=False, integer=True)
