"""Stage keys of a CCA run, from the config and the upstream keys alone: each stage's key hashes
exactly the inputs that change its output, so a changed setting recomputes that stage and the ones
downstream of it, and nothing else."""

from __future__ import annotations

from pathlib import Path

from cca_ray.config import CCAConfig
from cca_ray.stages import stage_key

PROMPT = {"n_shots", "chat_template"}  # how problems are prompted: the base evaluation's input
FILTER = {"template_threshold", "template_min_accuracy"}  # the filter's output keys the traces


def data_key(c: CCAConfig) -> str:
    """The problems and their split: the data settings but the prompt's and the filter's."""
    return stage_key("data", c.data.model_dump(exclude=PROMPT | FILTER))


def base_key(c: CCAConfig, data: str) -> str:
    return stage_key("base_eval", data, c.model.model_dump(), c.data.model_dump(include=PROMPT),
                     c.evaluation.max_new_tokens)


def traces_key(c: CCAConfig, base: str, kept: list) -> str:
    """The kept templates (the filter's output) rather than its thresholds: a threshold change that
    keeps the same templates reuses the traces; the cores change the speed, not the traces."""
    speed = {"cpu_threads", "sync_timeout_s"}  # how fast, not what: the traces are the same
    return stage_key("traces", base, c.sampling.model_dump(exclude=speed), [str(k) for k in kept])


def localize_key(c: CCAConfig, traces: str) -> str:
    """The held-out split comes after this stage (split_key), so its settings are not part of it."""
    return stage_key("localize", traces, c.localize.model_dump(exclude={"heldout_fraction", "heldout_seed"}))


def split_key(c: CCAConfig, localize: str) -> str:
    return stage_key("split", localize, c.localize.heldout_fraction, c.localize.heldout_seed)


def dcm_key(c: CCAConfig, split: str) -> str:
    return stage_key("dcm", split, c.dcm.model_dump(by_alias=True), c.model.architecture)


def rows_update_key(c: CCAConfig, dcm: str, arm: str, lr: float) -> str:
    """A row update (CCA's selection or a random one of the same size) at one lr."""
    settings = c.update.model_dump(exclude={"lr", "lr_grid", "random_seeds"})
    return stage_key("update", dcm, arm, lr, settings, c.evaluation.max_new_tokens)


def nomask_key(c: CCAConfig, split: str, method: str, lr: float) -> str:
    """CCA's loss on every parameter: the train pivots and the update's step settings, no mask."""
    return stage_key("update", split, method, lr, c.evaluation.max_new_tokens,
                     c.update.model_dump(include={"steps", "micro_batch_size", "max_examples"}))


def sft_key(c: CCAConfig, base: str, kept: list, method: str, lr: float, lora: bool) -> str:
    """Supervised fine-tuning on the kept templates' train problems (LoRA: its settings; full: ZeRO's)."""
    s = c.compare.sft
    settings = s.model_dump(exclude={"zero_stage"} if lora else {"lora_r", "lora_alpha", "lora_dropout"})
    return stage_key("update", base, [str(k) for k in kept], method, lr, settings,
                     c.evaluation.max_new_tokens)


def evaluation_key(c: CCAConfig, run_path: str, deltas: str) -> str:
    """A run's test evaluation, keyed by the run's stage folder name (its key), not where it lies."""
    return stage_key("test_eval", Path(run_path).name, c.evaluation.max_new_tokens, deltas)


def general_key(c: CCAConfig, base: str, run_path: str | None) -> str:
    return stage_key("general", base, Path(run_path).name if run_path else None, c.evaluation.model_dump())
