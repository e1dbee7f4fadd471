"""The circuits system's one config object (`cca-ray circuits ... --config FILE`), validated at the
edge like the CCA config: an unknown key or a bad value fails naming the file and the field.
Defaults are the built-in CPU-sized run (tune_configs/circuits-default.yaml spells them out).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from cca_ray.circuits.bridges import BridgeSpec
from cca_ray.circuits.model import ModelSpec
from cca_ray.circuits.prune import PruneSpec
from cca_ray.circuits.tasks import TASKS
from cca_ray.circuits.train import TrainSpec
from cca_ray.config import ConfigError, LoggersSection, Range, Resources, Section, describe


class CorpusSection(Section):
    """The synthetic Python-like corpus and its BPE tokenizer."""

    train_docs: int = Field(40_000, ge=100)
    val_docs: int = Field(2_000, ge=10)
    vocab_size: int = Field(512, ge=64, le=65_536)
    seed: int = Field(0, ge=0)
    opening_tokens: bool = Field(True, description='`("` and `(\'` as tokens of their own: an opening '
                                                    "quote is never the closing quote's token")


class ModelSection(Section):
    n_layer: int = Field(2, ge=1)
    d_model: int = Field(256, ge=16)
    d_head: int = Field(16, ge=1)
    d_mlp: int = Field(1024, ge=4)
    n_ctx: int = Field(64, ge=16)
    sinks: bool = True
    bigram: bool = True
    pos_emb: bool = False
    act_topk_fraction: float | None = Field(0.25, gt=0, le=1, description="AbsTopK k = dim x this; null: off")

    @model_validator(mode="after")
    def _heads(self) -> ModelSection:
        if self.d_model % self.d_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of d_head ({self.d_head})")
        return self

    def spec(self, vocab_size: int) -> ModelSpec:
        return ModelSpec(vocab_size=vocab_size, **self.model_dump())


class TrainSection(Section):
    steps: int = Field(4000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-2, gt=0)
    embed_l0_factor: float = Field(1.0, ge=1, description="embeddings keep min(1, this x L0)")
    min_per_neuron: int = Field(4, ge=0)
    anneal_start: float = Field(0.01, ge=0, le=1)
    anneal_end: float = Field(0.5, ge=0, le=1)
    warmup: float = Field(0.01, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(0.1, gt=0)
    eval_every: int = Field(250, ge=1)
    eval_batches: int = Field(8, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    seed: int = Field(0, ge=0)
    match_every: int = Field(50, ge=1, description="a matched-loss variant checks its val loss this often")
    threads: int = Field(2, ge=1, description="CPU threads of training, the means and the bridges, pinned "
                                              "with deterministic kernels (results depend on it)")

    @model_validator(mode="after")
    def _anneal(self) -> TrainSection:
        if self.anneal_start > self.anneal_end:
            raise ValueError(f"anneal_start ({self.anneal_start}) must not exceed "
                             f"anneal_end ({self.anneal_end})")
        return self

    def spec(self, l0_target: float, stop_at_loss: float | None = None) -> TrainSpec:
        return TrainSpec(l0_target=l0_target, stop_at_loss=stop_at_loss,
                         **self.model_dump(exclude={"threads"}))


class Variant(Section):
    """One model to train: the sparse model and its dense twin differ only in l0_target."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    l0_target: float = Field(gt=0, le=1, description="fraction of each weight matrix kept (1.0: dense)")
    match_loss_of: str | None = Field(None, description="train after this variant and stop at its final "
                                                        "val loss (the paper compares at matched loss)")


class PruneSection(Section):
    steps: int = Field(300, ge=1)
    batch_pairs: int = Field(64, ge=1)
    train_pairs: int = Field(1024, ge=2)
    val_pairs: int = Field(256, ge=2)
    test_pairs: int = Field(256, ge=2)
    lr: float = Field(3e-3, gt=0)
    k_coef: float = Field(1e-4, ge=0, description="the node penalty (with the controller: its start)")
    init_noise_scale: float = Field(1e-2, ge=0)
    init_noise_bias: float = Field(1e-1)
    weight_decay: float = Field(1e-3, ge=0)
    temperature: float = Field(1.0, gt=0)
    warmup: float = Field(0.05, ge=0, le=1)
    inv_beta2: float = Field(0.05, gt=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    target_loss: float = Field(0.15, gt=0)
    lbfgs_steps: int = Field(16, ge=1)
    necessity_threshold: float = Field(0.5, gt=0)
    mean_windows: int = Field(512, ge=1, description="corpus windows the ablation means are taken over")
    seed: int = Field(0, ge=0)
    controller: bool = Field(True, description="steer k_coef toward controller_level x target_loss")
    controller_level: float = Field(0.5, gt=0, le=1)
    k_coef_min: float = Field(1e-6, ge=0)
    k_coef_max: float = Field(3e-2, gt=0)
    controller_rate: float = Field(0.03, gt=0, le=1)
    calibrated: bool = Field(True, description="bisect over the learned mask's nodes on calibrated loss")
    max_scale: float = Field(4.0, gt=0, description="cap of the calibration's logit scale")
    selection_margin: float = Field(0.8, gt=0, le=1, description="calibrated selection aims at this x "
                                                                 "target_loss on validation pairs")
    cleanup: bool = Field(True, description="greedy removal confirmed on held-out pairs (needs calibrated)")
    cleanup_screen_pairs: int = Field(64, ge=0, description="cleanup tries a removal on this many "
                                      "validation pairs first; only one passing there is judged on all "
                                      "(0: off)")
    tied_qk: bool = Field(False, description="one mask value for q channel i and k channel i of a layer")
    necessity_repair: bool = Field(True, description="when the model can route around a circuit (ablating "
                                   "it leaves the task solved), add the nodes of that other route until "
                                   "ablating the circuit breaks the task")
    distractors: bool = Field(False, description="closed strings / lists may precede a quote or bracket "
                                                "decision (the harder variant); false: none do")

    def spec(self, **override) -> PruneSpec:
        fields = PruneSpec.__dataclass_fields__
        return PruneSpec(**{**{k: v for k, v in self.model_dump().items() if k in fields}, **override})


def _default_space() -> dict[str, Range]:
    """The controller's level, the lr and the seed (the paper's CARBS searched these among others)."""
    return {"controller_level": Range(low=0.2, high=0.9, log=False), "lr": Range(low=1e-3, high=3e-2),
            "seed": Range(low=0, high=15, log=False, integer=True)}


SEARCHABLE = ("k_coef", "lr", "init_noise_scale", "init_noise_bias", "weight_decay", "temperature", "warmup",
              "controller_level", "seed")


class SearchSection(Section):
    """Ray Tune in CARBS's place: per (model, task), the pruning hyperparameters minimising the
    circuit size among trials that reach the target loss (the first trial is the paper's centres)."""

    num_samples: int = Field(2, ge=1)
    max_concurrent_trials: int = Field(2, ge=1, description="trials of one (model, task) at a time")
    max_concurrent_searches: int = Field(8, ge=1, description="(model, task) searches at a time, their "
                                         "trials sharing the CPUs (speed only: not in any stage key)")
    search: str = Field("optuna", pattern="^(optuna|random)$")
    space: dict[str, Range] = Field(default_factory=_default_space)
    trial: Resources = Field(default_factory=lambda: Resources(num_cpus=1, threads=1),
                             description="each trial's Ray resources; threads (default 1) pins its results")
    seed: int = Field(0, ge=0, description="mixed with each (model, task)'s names: their searches differ")
    loggers: LoggersSection = Field(default_factory=LoggersSection)

    @model_validator(mode="after")
    def _known(self) -> SearchSection:
        bad = sorted(set(self.space) - set(SEARCHABLE))
        if bad:
            raise ValueError(f"unknown hyperparameter(s) {', '.join(bad)}; "
                             f"searchable: {', '.join(SEARCHABLE)}")
        return self


class BridgesSection(Section):
    """Encoders / decoders between the dense model's and the sparse model's residual streams, one
    pair per sublayer, trained after both models (both frozen) on corpus windows."""

    enabled: bool = True
    dense: str = Field("dense", description="the variant bridged from")
    sparse: str = Field("sparse", description="the variant bridged to")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    nmse_coef: float = Field(1.0, ge=0)
    kl_coef: float = Field(1.0, ge=0)
    topk_fraction: float | None = Field(0.25, gt=0, le=1, description="the encoder's AbsTopK; null: off")
    seed: int = Field(0, ge=0)

    def spec(self) -> BridgeSpec:
        return BridgeSpec(**self.model_dump(exclude={"enabled", "dense", "sparse"}))


class ReportSection(Section):
    snippets_per_node: int = Field(5, ge=0)
    snippet_tokens: int = Field(16, ge=2)
    snippet_windows: int = Field(256, ge=1)


class CircuitsConfig(Section):
    corpus: CorpusSection = Field(default_factory=CorpusSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    variants: list[Variant] = Field(default_factory=lambda: [
        Variant(name="sparse", l0_target=1 / 64),
        Variant(name="dense", l0_target=1.0, match_loss_of="sparse")], min_length=1)
    tasks: list[str] = Field(default_factory=lambda: list(TASKS), min_length=1)
    prune: PruneSection = Field(default_factory=PruneSection)
    search: SearchSection = Field(default_factory=SearchSection)
    bridges: BridgesSection = Field(default_factory=BridgesSection)
    report: ReportSection = Field(default_factory=ReportSection)
    train_resources: Resources = Field(default_factory=lambda: Resources(num_cpus=1, threads=1),
                                       description="each variant trains as one Ray task with these "
                                                   "(its training runs with train.threads)")

    @model_validator(mode="after")
    def _check(self) -> CircuitsConfig:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {', '.join(bad)}; known: {', '.join(TASKS)}")
        outside = [f"prune.{k} = {getattr(self.prune, k)} (search.space.{k}: {r.low}..{r.high})"
                   for k, r in self.search.space.items() if not r.low <= getattr(self.prune, k) <= r.high]
        if outside:
            raise ValueError("the search's first trial is the prune values, which must lie in their "
                             "ranges: " + "; ".join(outside))
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dup)}")
        by_name = {v.name: v for v in self.variants}
        b = self.bridges
        if b.enabled and {b.dense, b.sparse} <= set(by_name) and b.dense == b.sparse:
            raise ValueError(f"bridges.dense and bridges.sparse are both {b.dense!r}; name two variants")
        for v in (v for v in self.variants if v.match_loss_of):
            ref = by_name.get(v.match_loss_of)
            if ref is None or ref is v:
                raise ValueError(f"variant {v.name!r}: match_loss_of must name another variant "
                                 f"({', '.join(n for n in names if n != v.name)})")
            if ref.match_loss_of:
                raise ValueError(f"variant {v.name!r}: matches {ref.name!r}, which itself matches "
                                 f"{ref.match_loss_of!r}; match a variant trained on its own")
        return self

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ConfigError(f"no variant {name!r}; this config has: {', '.join(v.name for v in self.variants)}")


def load_circuits_config(path: str | Path | None) -> CircuitsConfig:
    """Read and validate a circuits YAML file (None: the built-in defaults)."""
    if path is None:
        return CircuitsConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file (see tune_configs/circuits-default.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return CircuitsConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: {describe(e, CircuitsConfig)}" for e in exc.errors()]
        raise ConfigError("invalid circuits config:\n  " + "\n  ".join(lines)) from None
