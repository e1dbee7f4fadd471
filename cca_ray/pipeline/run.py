"""`cca-ray run`: template filter -> traces -> localisation -> DCM -> targeted update (lr search)
-> random-component control -> evaluation -> report, each stage an on-disk artifact keyed by its
inputs (pipeline/keys.py), so a rerun after a crash or a kill resumes at the first missing stage.
Each stage takes its inputs explicitly and returns an artifact that carries its key."""

from __future__ import annotations

import functools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from cca_ray.components import KINDS
from cca_ray.config import CCAConfig, dump_config
from cca_ray.data.gsm_symbolic import load_jsonl, write_problems
from cca_ray.data.splits import Splits, split_problems, write_splits
from cca_ray.data.template_filter import select_templates, template_accuracies
from cca_ray.dcm import DCMResult, Example, learn_mask, selected_components
from cca_ray.io import read_jsonl, write_json, write_jsonl, write_safetensors, write_text
from cca_ray.localize import LocalizationError, Pivot, localize, pivot_kinds, split_pivots
from cca_ray.methods import CCA, RANDOM, method
from cca_ray.pipeline import keys
from cca_ray.pipeline.engines import Engines
from cca_ray.pipeline.model import Loaded, load_model, load_problems
from cca_ray.sampling.traces import Trace, collect_traces
from cca_ray.stages import StageStore

log = logging.getLogger("cca_ray")


def pivot_examples(pivots: list[Pivot]) -> list[Example]:
    """The (prefix, desired, undesired) examples DCM and the updates train on."""
    return [Example(p.prefix["token_ids"], p.desired_token, p.undesired_token) for p in pivots]


def correct_rows(correct: dict[tuple, bool]) -> list[dict]:
    return [{"template_id": k[0], "instance_id": k[1], "correct": v} for k, v in correct.items()]


def correct_map(rows: list[dict]) -> dict[tuple, bool]:
    return {(r["template_id"], r["instance_id"]): r["correct"] for r in rows}


@dataclass
class Prepared:
    """What the shared stages produced: splits, base correctness, kept templates, the train pivots
    (``pivots``, all that DCM and the updates see), the held-out ones, and the keys of the stages
    that made them (later stages are keyed on these)."""

    splits: Splits
    correct: dict
    kept: list
    template_acc: dict
    pivots: list[Pivot]
    heldout: list[Pivot]
    loc_meta: dict
    base_key: str
    loc_key: str
    split_key: str


@dataclass
class Mask:
    """DCM's mask: the learnt values per kind, the selected components (m > 0.5, once), the summary."""

    key: str
    masks: dict[str, torch.Tensor]
    meta: dict

    @functools.cached_property
    def selected(self) -> dict[str, torch.Tensor]:
        return selected_components(self.masks)


class Pipeline:
    """One CCA run on one model: the shared stages (methods here), the updates (pipeline/updates.py)
    and the evaluations (pipeline/evaluate.py) on one stage store and one set of engines."""

    def __init__(self, config: CCAConfig, out: str | Path, progress: bool = True, sampler=None):
        """``sampler``: a sampler shared with others (e.g. a client of a Ray sampler actor) that
        takes HF-named weights in push_weights; None = start the configured backend here."""
        self.config, self.out, self.progress = config, Path(out), progress
        self.store = StageStore(self.out)
        self.timings: dict[str, float] = {}
        self.engines = Engines(config, lambda: self.m, progress, sampler)
        self.on_validation = None  # called with {arm, lr, step, val_accuracy} at every validation
        self._m: Loaded | None = None

    @classmethod
    def reopen(cls, run_dir: str | Path, progress: bool = False) -> Pipeline:
        """The pipeline of a finished `cca-ray run` folder (its config.yaml; its stages are reused)."""
        from cca_ray.config import load_config

        return cls(load_config(Path(run_dir) / "config.yaml"), run_dir, progress)

    @property
    def m(self) -> Loaded:
        if self._m is None:
            self._m = load_model(self.config, self.progress)
        return self._m

    def timed(self, name: str, meta: dict) -> dict:
        """Add a stage's seconds (from its meta, so a reused stage reports its original time)."""
        self.timings[name] = self.timings.get(name, 0.0) + meta["seconds"]
        return meta

    # ---- shared stages ---------------------------------------------------------------------
    def data(self) -> tuple[str, Splits]:
        """(key, splits) of the configured problems."""
        key = keys.data_key(self.config)

        def compute(tmp: Path) -> dict:
            problems = load_problems(self.config)
            write_problems(problems, tmp / "problems.jsonl")
            splits = split_problems(problems, self.config.data.split_ratios, seed=self.config.data.seed)
            write_splits(splits, tmp)
            return {"problems": len(problems), "splits": {n: len(p) for n, p in splits.items()},
                    "templates": len({p.id for p in problems})}

        path, meta = self.store.run("data", key, compute)
        self.timed("data", meta)
        return key, Splits(**{n: load_jsonl(path / f"{n}.jsonl") for n in ("train", "val", "test")})

    def base_eval(self, data_key: str, splits: Splits) -> tuple[str, dict, list, dict]:
        """(key, greedy correctness per split, kept templates, train+val accuracy per template): the
        base model on every split and the template filter from train+val."""
        settings = self.config.data
        key = keys.base_key(self.config, data_key)

        def compute(tmp: Path) -> dict:
            for name, problems in splits.items():
                write_jsonl(correct_rows(self.engines.greedy(problems, f"base greedy ({name})")),
                            tmp / f"{name}_correct.jsonl")
            return {}

        path, meta = self.store.run("base_eval", key, compute)
        self.timed("base_eval", meta)
        correct = {n: correct_map(read_jsonl(path / f"{n}_correct.jsonl")) for n in ("train", "val", "test")}
        acc = template_accuracies(splits, {**correct["train"], **correct["val"]})
        kept = select_templates(acc, settings.template_threshold, settings.template_min_accuracy)
        if not kept:
            raise LocalizationError(
                f"no template's train+val accuracy lies in [data.template_min_accuracy "
                f"{settings.template_min_accuracy}, data.template_threshold {settings.template_threshold}) "
                f"(lowest {min(acc.values()):.2f}, highest {max(acc.values()):.2f}); widen that range "
                f"to train on this model")
        return key, correct, kept, acc

    def traces(self, base_key: str, splits: Splits, kept: list) -> tuple[str, list[Trace]]:
        """(key, traces): greedy and sampled traces of the kept templates' train problems."""
        sampling = self.config.sampling
        key = keys.traces_key(self.config, base_key, kept)
        problems = [p for p in splits.train if p.id in set(kept)]

        def compute(tmp: Path) -> dict:
            prompt = self.m.prompt(self.config)
            prompts = [prompt(p.question) for p in problems]
            traces = collect_traces(self.engines.gen_sampler(), problems, prompts,
                                    sampling.n_samples, sampling.temperature, sampling.seed,
                                    sampling.max_new_tokens)
            write_jsonl([t.to_row() for t in traces], tmp / "traces.jsonl")
            with_contrast = sum(t.contrast_ids is not None for t in traces)
            log.info("traces: %d problems, %d with a contrasting sample", len(traces), with_contrast)
            return {"problems": len(traces), "with_contrast": with_contrast,
                    "greedy_correct": sum(t.greedy_correct for t in traces)}

        path, meta = self.store.run("traces", key, compute)
        self.timed("traces", meta)
        if meta["with_contrast"] == 0:
            raise LocalizationError(
                f"none of the {meta['problems']} training problems has a sampled trace whose correctness "
                f"differs from greedy ({sampling.n_samples} samples at temperature "
                f"{sampling.temperature}); raise sampling.n_samples or sampling.temperature")
        return key, [Trace.from_row(r) for r in read_jsonl(path / "traces.jsonl")]

    def localization(self, traces_key: str, traces: list[Trace]) -> tuple[str, list[Pivot], dict]:
        """(key, pivots, summary): the pivotal tokens where greedy and contrasting traces diverge."""
        settings = self.config.localize
        key = keys.localize_key(self.config, traces_key)

        def compute(tmp: Path) -> dict:
            sampler = self.engines.gen_sampler() if settings.method != "prefix" else None
            loc = localize(settings.method, traces, sampler, self.m.tokenizer,
                           self.config.sampling.max_new_tokens, settings.chunk, self.progress)
            pivots = loc.pivots
            if settings.max_examples and len(pivots) > settings.max_examples:
                pivots = random.Random(0).sample(pivots, settings.max_examples)
                loc.dropped["over localize.max_examples"] += len(loc.pivots) - len(pivots)
            write_jsonl([p.to_row() for p in pivots], tmp / "localization.jsonl")
            summary = loc.summary() | {"examples": len(pivots),
                                       "pivot_kinds": pivot_kinds(pivots, self.m.tokenizer)}
            log.info("localisation (%s): %d examples %s, dropped %s", settings.method, len(pivots),
                     summary["pivot_kinds"], dict(loc.dropped))
            return summary

        path, meta = self.store.run("localize", key, compute)
        self.timed("localize", meta)
        if meta["examples"] < settings.min_examples:
            raise LocalizationError(
                f"localisation ({settings.method}) kept {meta['examples']} examples, below "
                f"localize.min_examples {settings.min_examples} (dropped: {meta['dropped']}); sample more "
                f"(sampling.n_samples, more templates via data.template_threshold) or lower "
                f"localize.min_examples")
        return key, [Pivot.from_row(r) for r in read_jsonl(path / "localization.jsonl")], meta

    def split(self, loc_key: str, pivots: list[Pivot]) -> tuple[str, list[Pivot], list[Pivot]]:
        """(key, train, held-out) pivots (localize.heldout_fraction, seeded): DCM and every update see
        only the train ones; the held-out ones are only measured (pivot diagnostics)."""
        settings = self.config.localize
        train, heldout = split_pivots(pivots, settings.heldout_fraction, settings.heldout_seed)
        log.info("pivots: %d train, %d held out", len(train), len(heldout))
        return keys.split_key(self.config, loc_key), train, heldout

    def prepare(self) -> Prepared:
        """The stages every search trial shares: data, base evaluation and template filter,
        traces, localisation and the held-out split (computed once, then reused from the store)."""
        data_key, splits = self.data()
        base_key, correct, kept, acc = self.base_eval(data_key, splits)
        traces_key, traces = self.traces(base_key, splits, kept)
        loc_key, pivots, loc_meta = self.localization(traces_key, traces)
        split_key, train, heldout = self.split(loc_key, pivots)
        return Prepared(splits, correct, kept, acc, train, heldout, loc_meta, base_key, loc_key, split_key)

    def dcm(self, prep: Prepared) -> Mask:
        """DCM's mask on the train pivots (cached per its settings: trials with one lambda share it)."""
        settings = self.config.dcm
        key = keys.dcm_key(self.config, prep.split_key)

        def compute(tmp: Path) -> dict:
            res: DCMResult = learn_mask(
                self.m.model, pivot_examples(prep.pivots), self.m.tokenizer.pad_token_id,
                lam=settings.lambda_, lr=settings.lr, epochs=settings.epochs, batch_size=settings.batch_size,
                lr_step_epochs=settings.lr_step_epochs, lr_gamma=settings.lr_gamma,
                early_stop_fraction=settings.early_stop_fraction, seed=settings.seed,
                architecture=self.config.model.architecture, progress=self.progress)
            write_safetensors(res.masks, tmp / "mask.safetensors")
            summary = res.summary()
            write_json(summary, tmp / "summary.json")
            log.info("DCM: %d of %d components selected (%.2f%%) %s", summary["components_selected"],
                     summary["components_total"], 100 * summary["components_fraction"],
                     summary["selected_per_kind"])
            return {k: summary[k] for k in ("components_selected", "components_total",
                                            "components_fraction", "selected_per_kind", "epochs_run")}

        path, meta = self.store.run("dcm", key, compute)
        self.timed("dcm", meta)
        masks = load_file(str(path / "mask.safetensors"))
        return Mask(key, {k: masks[k] for k in KINDS}, meta)

    # ---- methods and the whole run ---------------------------------------------------------
    def method_run(self, name: str, lr: float, prep: Prepared, mask: Mask | None = None,
                   seed: int = 0) -> dict:
        """One run of a method (methods.py) at one lr; a method on DCM's selection needs ``mask``."""
        m = method(name)
        if m.needs_mask and mask is None:
            raise ValueError(f"method {name!r} needs the DCM mask")
        return m.run(self, prep, lr, mask, seed)

    def lr_runs(self, name: str, prep: Prepared, mask: Mask, seed: int = 0) -> list[dict]:
        """The method's run at every lr of update.lrs (CCA's grid, which the random seeds share)."""
        return [self.method_run(name, lr, prep, mask, seed) for lr in self.config.update.lrs]

    def close(self) -> None:
        """Shut a vLLM engine down (its worker processes would otherwise outlive a failed run)."""
        self.engines.close()

    def report(self, prep: Prepared, start: float | None = None) -> dict:
        """DCM, CCA's lr grid, the random control, then the final evaluations and the report, written
        to DIR (``start``: this invocation's start, for its total time)."""
        from cca_ray.pipeline.evaluate import final_report
        from cca_ray.reports.run import write_report

        mask = self.dcm(prep)
        cca_runs = self.lr_runs(CCA, prep, mask)
        random_runs = [self.lr_runs(RANDOM, prep, mask, s) for s in range(self.config.update.random_seeds)]
        report = final_report(self, prep, mask, cca_runs, random_runs)
        if start is not None:
            report["timings"]["total_this_invocation"] = round(time.perf_counter() - start, 1)
        write_report(report, self.out)
        return report

    def run(self) -> dict:
        """The whole run: the shared stages, then `report`; the engines are shut down after."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(dump_config(self.config), self.out / "config.yaml")
            start = time.perf_counter()
            _ = self.m  # an unsupported architecture or a missing model fails before any stage
            report = self.report(self.prepare(), start)
            log.info("stages reused: %s; computed: %s", self.store.reused, self.store.computed)
            return report
        finally:
            self.close()
