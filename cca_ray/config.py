"""The one config object: typed sections loaded from YAML and validated once, at the edge.

An unknown key, a wrong type or an out-of-range value fails with the file, the field and the
allowed values. Defaults are the numbers of the method doc (../shared/docs/cca-method.md).
Stages receive the section they need, not the whole config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cca_ray.errors import UserError

BUILTIN = "builtin"  # data.path / model.name value meaning "the project's own tiny world"


class ConfigError(UserError, ValueError):
    """A config file that does not validate; one line per bad field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelConfig(Section):
    name: str = Field(BUILTIN, min_length=1, description="HF hub id, local folder, 'builtin', a packaged "
                                                       "GGUF model (smollm2-135m-instruct) or a .gguf file")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    architecture: str | None = Field(None, description="override the config's model_type")
    builtin_steps: int | None = Field(None, ge=1, le=1_000_000,
                                      description="built-in model variant: its training steps (None = "
                                                  "the default build)")


class DataConfig(Section):
    source: Literal["templates", "jsonl", "hub"] = "templates"
    path: str = Field(BUILTIN, description="templates folder / JSONL file; 'builtin' = the tiny world's; "
                                           "'basic' = everyday 1-2 step stories for small real models")
    hub_config: Literal["main", "p1", "p2"] = "main"
    instances_per_template: int = Field(50, ge=3, le=100_000)
    split_ratios: tuple[float, float, float] = (0.52, 0.08, 0.40)
    seed: int = Field(0, ge=0)
    n_shots: int = Field(8, ge=0, le=8)
    chat_template: bool = False
    template_threshold: float = Field(0.8, gt=0, le=1)
    template_min_accuracy: float = Field(0.0, ge=0, lt=1,
                                         description="also drop templates whose train+val accuracy is "
                                                     "below this (no right traces to learn from)")

    @model_validator(mode="after")
    def _filter(self) -> DataConfig:
        if self.template_min_accuracy >= self.template_threshold:
            raise ValueError(f"template_min_accuracy ({self.template_min_accuracy}) must be below "
                             f"template_threshold ({self.template_threshold})")
        return self

    @model_validator(mode="after")
    def _ratios(self) -> DataConfig:
        if any(r <= 0 for r in self.split_ratios) or abs(sum(self.split_ratios) - 1) > 1e-6:
            raise ValueError(
                f"split_ratios must be 3 positive numbers summing to 1 (e.g. [0.52, 0.08, 0.40]),"
                f" got {list(self.split_ratios)}"
            )
        return self


class SamplingConfig(Section):
    backend: Literal["hf", "vllm"] = "hf"
    n_samples: int = Field(10, ge=1, le=1000)
    temperature: float = Field(1.0, gt=0, le=5)
    max_new_tokens: int = Field(1500, ge=1, le=32_768)
    batch_size: int = Field(16, ge=1)
    seed: int = Field(0, ge=0)
    cpu_threads: int | None = Field(None, ge=1, description="cores the in-process vLLM-CPU engine "
                                    "uses (None: vLLM's default, which keeps one core free)")
    sync_timeout_s: float = Field(300.0, gt=0, description="a weight sync into vLLM that takes longer "
                                  "fails the run or trial (Tune retries a trial)")


class LocalizeConfig(Section):
    method: Literal["prefix", "branching", "branching-batched", "branching-bisect"] = "prefix"
    min_examples: int = Field(8, ge=1)
    max_examples: int | None = Field(None, ge=1, description="seeded subset cap (speed); None = all")
    chunk: int = Field(8, ge=1, description="positions per round in branching-batched")
    heldout_fraction: float = Field(0.2, ge=0, lt=1, description="share of the pivots held out of DCM "
                                                                "and every update (transfer diagnostics)")
    heldout_seed: int = Field(0, ge=0, description="seed of the train / held-out pivot split")


class DCMConfig(Section):
    lambda_: float = Field(0.01, alias="lambda", ge=0, le=10)
    lr: float = Field(5e-3, gt=0, le=1)
    epochs: int = Field(50, ge=1, le=10_000)
    batch_size: int = Field(8, ge=1)
    lr_step_epochs: int = Field(5, ge=1)
    lr_gamma: float = Field(0.9, gt=0, le=1)
    early_stop_fraction: float = Field(0.2, gt=0, le=1)
    seed: int = Field(0, ge=0)


class UpdateConfig(Section):
    lr: float = Field(1e-4, gt=0, le=10)
    steps: int = Field(50, ge=1, le=100_000)
    optimizer: Literal["sgd", "adam"] = "sgd"
    micro_batch_size: int = Field(8, ge=1)
    gradient_checkpointing: bool = Field(False, description="recompute the decoder layers' activations in "
                                         "the backward: the same deltas, a lower peak memory, a slower step "
                                         "(the in-process update; zero_stage's ignores it)")
    kinds: list[Literal["q", "k", "v", "mlp"]] = Field(default_factory=lambda: ["q", "k", "v", "mlp"])
    lr_grid: list[float] = Field(default_factory=list,
                                 description="lrs tried for CCA and for each random seed alike (best by "
                                             "val); empty = just lr")
    random_seeds: int = Field(3, ge=0, le=100, description="random-component control runs")
    max_examples: int | None = Field(None, ge=1, description="seeded subset of the train pivots each "
                                     "update step uses (DCM uses them all); None = all")
    zero_stage: int | None = Field(None, ge=0, le=3,
                                   description="train the rows under DeepSpeed ZeRO at this stage (the "
                                               "TrainerActor's path); None = plain in-process update")

    @model_validator(mode="after")
    def _grid(self) -> UpdateConfig:
        if any(not 0 < lr <= 10 for lr in self.lr_grid):
            raise ValueError(f"lr_grid values must be in (0, 10], got {self.lr_grid}")
        if not self.kinds:
            raise ValueError("kinds must name at least one of q, k, v, mlp")
        return self

    @property
    def lrs(self) -> list[float]:
        return sorted(set(self.lr_grid)) if self.lr_grid else [self.lr]


class EvaluationConfig(Section):
    max_new_tokens: int = Field(1500, ge=1, le=32_768)
    general_tasks: list[str] = Field(default_factory=list)
    num_fewshot: dict[str, int] = Field(default_factory=dict)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1, description="greedy evaluation batch size")


class Resources(Section):
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    threads: int | None = Field(None, ge=1, description="OMP/torch threads of the actor's process (None: "
                                                         "Ray's default, num_cpus rounded down, at least 1)")


class ResourcesConfig(Section):
    """Ray resources per actor of one model (fractions allowed: a 2-core laptop shares its CPUs)."""

    sampler: Resources = Field(default_factory=lambda: Resources(num_cpus=1, num_gpus=0))
    trainer: Resources = Field(default_factory=lambda: Resources(num_cpus=1, num_gpus=0))
    eval: Resources = Field(default_factory=lambda: Resources(num_cpus=1, num_gpus=0))
    trial: Resources = Field(default_factory=lambda: Resources(num_cpus=0.1, num_gpus=0),
                             description="the Tune trial's own process (it only drives its trainer)")


class Range(Section):
    low: float = Field(ge=0)
    high: float = Field(ge=0)
    log: bool = True
    integer: bool = Field(False, description="whole numbers from low to high, both included (e.g. a seed)")

    @model_validator(mode="after")
    def _order(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low}); set log: false for a linear one")
        if self.integer and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"an integer range needs whole bounds (got {self.low}..{self.high})")
        return self


class LoggersSection(Section):
    """Tune's logger callbacks for a search. CSV and JSON are always written (Tune's own analysis
    reads them); TensorBoard event files and an MLflow run per trial are chosen here."""

    tensorboard: bool = True
    mlflow: bool = Field(False, description="an MLflow run per trial (needs mlflow or mlflow-skinny)")
    mlflow_tracking_uri: str | None = Field(None, description="default: a local SQLite file, "
                                                              "OUT/mlflow.db (no server, works offline)")
    mlflow_experiment: str | None = Field(None, description="default: the Tune experiment's name")


class TuneSection(Section):
    """The per-model search (`cca-ray sweep`): DCM lambda and update lr, searched together."""

    lambda_: Range = Field(default_factory=lambda: Range(low=0.005, high=0.1), alias="lambda")
    lambda_digits: int = Field(2, ge=1, le=6, description="lambda rounded to this many significant "
                                                          "digits, so trials can share masks")
    lr: Range = Field(default_factory=lambda: Range(low=1e-3, high=1e-1))
    search: Literal["optuna", "random"] = "optuna"
    scheduler: Literal["asha", "fifo"] = "asha"
    num_samples: int = Field(8, ge=1, le=10_000)
    max_concurrent_trials: int = Field(2, ge=1)
    grace_period: int = Field(3, ge=1, description="validations before ASHA may stop a trial")
    reduction_factor: int = Field(2, ge=2)
    max_failures: int = Field(1, ge=0, description="retries of a trial that raised")
    objective: Literal["val_accuracy", "val_minus_general_drop"] = "val_accuracy"
    general_penalty: float = Field(1.0, ge=0, description="objective = val - penalty x mean general drop")
    seed: int = Field(0, ge=0)
    loggers: LoggersSection = Field(default_factory=LoggersSection)


METHODS = ("cca", "full_ft", "lora", "no_mask", "random")  # `cca-ray compare`'s methods


class SFTConfig(Section):
    """Supervised fine-tuning baselines (full and LoRA): the method doc's section 6 numbers. Their AdamW
    lr is searched by Tune in compare.lr (full fine-tuning's default range is centred on the doc's 1e-5)."""

    steps: int = Field(200, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_fraction: float = Field(0.03, ge=0, lt=1)
    eval_every: int = Field(20, ge=1, description="validation every this many steps (and at 0 and the end)")
    max_length: int = Field(2048, ge=8)
    zero_stage: int | None = Field(2, ge=0, le=3, description="full fine-tuning under DeepSpeed ZeRO at "
                                                              "this stage; None = plain PyTorch")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)


class MethodRanges(Section):
    """The lr range Tune searches for each method (None: cca and random use tune.lr)."""

    cca: Range | None = None
    random: Range | None = None
    full_ft: Range = Field(default_factory=lambda: Range(low=1e-6, high=1e-4))
    lora: Range = Field(default_factory=lambda: Range(low=1e-5, high=1e-3))
    no_mask: Range = Field(default_factory=lambda: Range(low=1e-5, high=1e-2))


class CompareConfig(Section):
    """`cca-ray compare`: every method tuned with the same number of trials, then tested alike."""

    methods: list[Literal["cca", "full_ft", "lora", "no_mask", "random"]] = Field(
        default_factory=lambda: list(METHODS))
    num_samples: int = Field(4, ge=1, le=10_000, description="Tune trials per method (the same for each)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="trials at a time (None: "
                                                                      "tune.max_concurrent_trials)")
    lr: MethodRanges = Field(default_factory=MethodRanges)
    sft: SFTConfig = Field(default_factory=SFTConfig)

    @model_validator(mode="after")
    def _methods(self) -> CompareConfig:
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must list each of {', '.join(METHODS)} at most once, "
                             f"got {self.methods}")
        if "random" in self.methods and "cca" not in self.methods:
            raise ValueError("method 'random' draws as many components as CCA's mask: list 'cca' too")
        return self


class CCAConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    localize: LocalizeConfig = Field(default_factory=LocalizeConfig)
    dcm: DCMConfig = Field(default_factory=DCMConfig)
    update: UpdateConfig = Field(default_factory=UpdateConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tune: TuneSection = Field(default_factory=TuneSection)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)


class SweepModel(Section):
    key: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the model's folder name")
    config: str = Field(description="its per-model config YAML, relative to the sweep file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="merged into that config")


class SweepConfig(Section):
    models: list[SweepModel] = Field(min_length=1)
    max_concurrent_models: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _unique(self) -> SweepConfig:
        keys = [m.key for m in self.models]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"model keys must be unique; repeated: {', '.join(dup)}")
        return self


def _field_model(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section model that owns the last key of an error location."""
    model: Any = root
    for part in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = next((f for n, f in model.model_fields.items()
                      if part in (n, f.alias)), None)
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def describe(error: dict, root: type[BaseModel]) -> str:
    loc = tuple(error["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        owner = _field_model(root, loc)
        allowed = sorted(f.alias or n for n, f in owner.model_fields.items()) if owner else []
        return f"{field}: unknown key; allowed keys here: {', '.join(allowed)}"
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{field}: {error['msg']}{got_text}"


def parse_config(raw: Any, source: str = "<config>") -> CCAConfig:
    """Validate a mapping (e.g. parsed YAML) into a CCAConfig, or raise ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, "
                          f"got {type(raw).__name__}")
    try:
        return CCAConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {describe(e, CCAConfig)}" for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path) -> CCAConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file (see tune_configs/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw, str(path))


def dump_config(config: CCAConfig) -> str:
    """The config as YAML (aliases such as 'lambda' used), e.g. to store beside artifacts."""
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_sweep(path: str | Path) -> tuple[SweepConfig, dict[str, CCAConfig]]:
    """A sweep file and every model config it names (overrides merged in), all validated now."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep file (see tune_configs/sweep-default.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        sweep = SweepConfig.model_validate(raw if raw is not None else {})
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        lines = [f"{path}: {describe(e, SweepConfig)}" for e in exc.errors()]
        raise ConfigError("invalid sweep file:\n  " + "\n  ".join(lines)) from None
    configs = {}
    for m in sweep.models:
        cfg_path = (path.parent / m.config).resolve()
        if not cfg_path.is_file():
            raise ConfigError(f"{path}: models[{m.key}].config: no such file {cfg_path}")
        base = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        configs[m.key] = parse_config(_merge(base, m.overrides), f"{cfg_path} (+ overrides of {m.key})")
    return sweep, configs
