"""A changed CCA config recomputes exactly the stages whose inputs changed: for one setting of each
section, the stage keys (pipeline/keys.py, which the pipeline's stages use; test_pipeline checks
the folders of a real run against them) change for that stage and the ones downstream, and for no
other. Pure: no model, no run."""

from __future__ import annotations

import pytest

from cca_ray.config import CCAConfig, parse_config
from cca_ray.pipeline import keys

KEPT = ["t1", "t2"]
LRS = (1e-3, 1e-2)


def stage_keys(c: CCAConfig, kept: list = KEPT, lrs: tuple = LRS) -> dict[str, str]:
    """Every stage key of a run with this config (the update stages at LRS; test and general
    evaluations keyed on a fixed run folder, as the real ones are keyed on their run's folder)."""
    k = {"data": keys.data_key(c)}
    k["base_eval"] = keys.base_key(c, k["data"])
    k["traces"] = keys.traces_key(c, k["base_eval"], kept)
    k["localize"] = keys.localize_key(c, k["traces"])
    k["split"] = keys.split_key(c, k["localize"])
    k["dcm"] = keys.dcm_key(c, k["split"])
    for lr in lrs:
        k[f"update-cca-{lr}"] = keys.rows_update_key(c, k["dcm"], "cca", lr)
        k[f"update-random0-{lr}"] = keys.rows_update_key(c, k["dcm"], "random0", lr)
        k[f"update-no_mask-{lr}"] = keys.nomask_key(c, k["split"], "no_mask", lr)
        k[f"update-full_ft-{lr}"] = keys.sft_key(c, k["base_eval"], kept, "full_ft", lr, lora=False)
        k[f"update-lora-{lr}"] = keys.sft_key(c, k["base_eval"], kept, "lora", lr, lora=True)
    k["test"] = keys.evaluation_key(c, "/run/update-cca", "best")
    k["general-base"] = keys.general_key(c, k["base_eval"], None)
    return k


UPDATES = {f"update-{m}-{lr}" for m in ("cca", "random0", "no_mask", "full_ft", "lora") for lr in LRS}
ROWS = {f"update-{m}-{lr}" for m in ("cca", "random0") for lr in LRS}
SFT = {f"update-{m}-{lr}" for m in ("full_ft", "lora") for lr in LRS}
AFTER_SPLIT = {"dcm"} | ROWS | {f"update-no_mask-{lr}" for lr in LRS}
AFTER_BASE = {"base_eval", "traces", "localize", "split", "general-base"} | AFTER_SPLIT | SFT

CHANGES = [  # (section, values, the stages that must recompute)
    ("data", {"seed": 7}, {"data"} | AFTER_BASE),
    ("data", {"n_shots": 2}, AFTER_BASE),  # the same problems, prompted otherwise
    ("data", {"template_threshold": 0.9}, set()),  # the same kept templates: nothing recomputes
    ("model", {"dtype": "bfloat16"}, AFTER_BASE),
    ("evaluation", {"max_new_tokens": 99}, AFTER_BASE | {"test"}),
    ("sampling", {"temperature": 0.9}, {"traces", "localize", "split"} | AFTER_SPLIT),
    ("sampling", {"cpu_threads": 2}, set()),  # the cores change the speed, not the traces
    ("sampling", {"sync_timeout_s": 30.0}, set()),  # nor does the weight sync's timeout
    ("localize", {"chunk": 3}, {"localize", "split"} | AFTER_SPLIT),
    ("localize", {"heldout_fraction": 0.3}, {"split"} | AFTER_SPLIT),
    ("dcm", {"lambda": 0.05}, {"dcm"} | ROWS),
    ("update", {"steps": 11}, ROWS | {f"update-no_mask-{lr}" for lr in LRS}),
    ("update", {"optimizer": "adam"}, ROWS),
    ("update", {"gradient_checkpointing": True}, ROWS),  # keyed like micro_batch_size (the rows updates')
    ("update", {"lr_grid": [1e-3, 1e-2, 0.1], "random_seeds": 5}, set()),  # only new runs are added
    ("compare", {"sft": {"lora_r": 4}}, {f"update-lora-{lr}" for lr in LRS}),
    ("compare", {"sft": {"zero_stage": 3}}, {f"update-full_ft-{lr}" for lr in LRS}),
    ("compare", {"sft": {"steps": 50}}, SFT),
    ("evaluation", {"limit": 5}, {"general-base"}),
    ("tune", {"num_samples": 9}, set()),
    ("resources", {"trainer": {"num_cpus": 2}}, set()),
]


@pytest.mark.parametrize(("section", "values", "expected"), CHANGES,
                         ids=[f"{s}.{'.'.join(v)}" for s, v, _ in CHANGES])
def test_a_changed_setting_recomputes_exactly_its_stages(section, values, expected) -> None:
    before = stage_keys(CCAConfig())
    raw = CCAConfig().model_dump(by_alias=True)
    for name, value in values.items():
        if isinstance(value, dict):
            raw[section][name] |= value
        else:
            raw[section][name] = value
    after = stage_keys(parse_config(raw))
    assert {name for name in before if before[name] != after[name]} == expected


def test_the_template_filter_keys_traces_by_the_templates_it_keeps() -> None:
    """A threshold change that keeps the same templates reuses the traces; other templates do not."""
    c = CCAConfig()
    same = stage_keys(c.model_copy(update={"data": c.data.model_copy(update={"template_threshold": 0.7})}))
    assert same["traces"] == stage_keys(c)["traces"]
    assert stage_keys(c, ["t1"])["traces"] != stage_keys(c)["traces"]


def test_every_run_has_its_own_key() -> None:
    k = stage_keys(CCAConfig())
    assert len(set(k.values())) == len(k)
