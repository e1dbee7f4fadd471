"""`cca-ray run`: template filter -> traces -> localisation -> DCM -> targeted update (lr search)
-> random-component control -> evaluation -> report, each stage an on-disk artifact keyed by its
inputs (cca_ray/stages.py), so a rerun after a crash or a kill resumes at the first missing stage."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cca_ray.components import KINDS, component_space
from cca_ray.config import BUILTIN, CCAConfig, ConfigError, dump_config
from cca_ray.data.answers import macro_accuracy
from cca_ray.data.gsm_symbolic import Problem, load_hub, load_jsonl, write_problems
from cca_ray.data.prompts import build_prompt
from cca_ray.data.splits import Splits, split_problems, write_splits
from cca_ray.data.template_filter import select_templates, template_accuracies
from cca_ray.data.templates import instantiate_templates, load_templates
from cca_ray.dcm import DCMResult, Example, learn_mask
from cca_ray.evaluate import accuracy_report, general_deltas, general_scores, greedy_correct, mcnemar_p
from cca_ray.io import write_json, write_jsonl
from cca_ray.localize import LocalizationError, Pivot, localize, pivot_kinds, split_pivots
from cca_ray.reports.run import write_report
from cca_ray.sampling import make_sampler
from cca_ray.sampling.traces import Trace, collect_traces
from cca_ray.stages import StageStore, stage_key
from cca_ray.update import RowDeltas, merge_rows, save_delta, selected_rows, targeted_update
from cca_ray.update.diagnostics import pivot_diagnostics
from cca_ray.update.train import validation_steps

log = logging.getLogger("cca_ray")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Loaded:
    """The base model (loaded on first use: a process that only drives a remote sampler never
    holds the weights), its tokenizer, where it came from, and how it is prompted."""

    def __init__(self, path: str, tokenizer, local_tasks: Path | None, dtype: str = "float32",
                 model: torch.nn.Module | None = None):
        self.path, self.tokenizer, self.local_tasks, self.dtype = path, tokenizer, local_tasks, dtype
        self._model = model

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            from transformers import AutoModelForCausalLM

            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, self.dtype))
            self._model = model.to(device).eval()
        return self._model

    def prompt(self, config: CCAConfig):
        d = config.data
        return lambda q: build_prompt(q, d.n_shots, d.chat_template, self.tokenizer)


def check_builtin_data(config: CCAConfig) -> None:
    """The built-in model was trained around exactly one set of val/test problems: other data
    settings would put its training questions into val/test, so refuse them at the edge."""
    from cca_ray.tiny.build import BuildSettings

    s, d = BuildSettings(), config.data
    want = {"source": "templates", "path": BUILTIN, "instances_per_template": s.instances_per_template,
            "seed": s.seed, "split_ratios": (0.52, 0.08, 0.40), "n_shots": 0, "chat_template": False}
    bad = [f"data.{k} = {getattr(d, k)!r} (needs {v!r})" for k, v in want.items()
           if (tuple(getattr(d, k)) if k == "split_ratios" else getattr(d, k)) != v]
    if bad:
        raise ConfigError("model.name 'builtin' was trained around the built-in data split; "
                          + "; ".join(bad) + ". Use tune_configs/default.yaml's data section.")


def model_path(config: CCAConfig, progress: bool = True) -> tuple[str, Path | None]:
    """Where the base model lives (the built-in one is built, a packaged GGUF converted, into the
    cache first) and its folder of local lm-eval tasks, if any."""
    from cca_ray.packaged import gguf_model_dir, is_gguf_source

    name = config.model.name
    if name == BUILTIN:
        from cca_ray.tiny.build import default_model_dir, ensure_built, is_built

        check_builtin_data(config)
        settings = builtin_settings(config)
        if not is_built(default_model_dir(settings)):
            log.info("building the built-in model (%d training steps; about 15 minutes on 2 quiet cores "
                     "at the default 3600) into %s", settings.spec.steps, default_model_dir(settings))
        path = ensure_built(settings, progress=progress)
        return str(path), path / "tasks"
    if is_gguf_source(name):
        path = gguf_model_dir(name, progress=progress)
        return str(path), path / "tasks"
    return name, (Path(name) / "tasks" if Path(name, "tasks").is_dir() else None)


def builtin_settings(config: CCAConfig):
    """Build settings of the built-in model variant the config names (model.builtin_steps)."""
    from dataclasses import replace

    from cca_ray.tiny.build import BuildSettings

    s = BuildSettings()
    steps = config.model.builtin_steps
    return replace(s, spec=replace(s.spec, steps=steps)) if steps else s


def load_model(config: CCAConfig, progress: bool = True) -> Loaded:
    """The base model: the built-in tiny model (built once into the cache) or an HF id/folder.
    The tokenizer and architecture are checked now; the weights load on first use."""
    from transformers import AutoConfig, AutoTokenizer

    from cca_ray.components import adapter_for

    path, local_tasks = model_path(config, progress)
    adapter_for(AutoConfig.from_pretrained(path), config.model.architecture)  # fail before any work
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Loaded(path, tokenizer, local_tasks, config.model.dtype)


def load_problems(config: CCAConfig) -> list[Problem]:
    d = config.data
    if d.source == "templates":
        from cca_ray.data.basic_templates import template_folder

        templates = load_templates(template_folder(d.path))
        problems, failures = instantiate_templates(templates, d.instances_per_template, d.seed)
        for reason in failures:
            log.warning("skipping template: %s", reason)
        return problems
    return load_jsonl(d.path) if d.source == "jsonl" else load_hub(d.hub_config)


def _examples(pivots: list[Pivot]) -> list[Example]:
    return [Example(p.prefix["token_ids"], p.desired_token, p.undesired_token) for p in pivots]


def _correct_rows(correct: dict[tuple, bool]) -> list[dict]:
    return [{"template_id": k[0], "instance_id": k[1], "correct": v} for k, v in correct.items()]


def _correct_map(rows: list[dict]) -> dict[tuple, bool]:
    return {(r["template_id"], r["instance_id"]): r["correct"] for r in rows}


class Pipeline:
    """One CCA run on one model; every stage method returns its (reused or fresh) artifact."""

    def __init__(self, config: CCAConfig, out: str | Path, progress: bool = True, sampler=None):
        """``sampler``: a sampler shared with others (e.g. a client of a Ray sampler actor) that
        takes HF-named weights in push_weights; None = start the configured backend here."""
        self.config, self.out, self.progress = config, Path(out), progress
        self.store = StageStore(self.out)
        self.timings: dict[str, float] = {}
        self._sampler = None
        self._gen_sampler = None
        self.shared_sampler = sampler
        self.on_validation = None  # called with {arm, lr, step, val_accuracy} at every validation
        self._m: Loaded | None = None

    @property
    def m(self) -> Loaded:
        if self._m is None:
            self._m = load_model(self.config, self.progress)
        return self._m

    # ---- shared pieces -------------------------------------------------------------------
    def _timed(self, name: str, meta: dict) -> dict:
        self.timings[name] = self.timings.get(name, 0.0) + meta["seconds"]
        return meta

    def eval_sampler(self):
        """Greedy evaluation runs on the configured backend too. HF sees the in-memory model as it
        is (hooks, merged rows); a vLLM engine is kept in step by pushing changed weights to it."""
        if self.config.sampling.backend != "hf" or self.shared_sampler is not None:
            return self.gen_sampler()
        if self._sampler is None:
            e = self.config.evaluation
            self._sampler = make_sampler("hf", model=self.m.model, tokenizer=self.m.tokenizer,
                                         batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                         progress=self.progress)
        return self._sampler

    def push(self, weights: dict[str, torch.Tensor]) -> None:
        """Make a separate inference engine (vLLM) see these weights (parameter name -> tensor)."""
        if weights and (self.shared_sampler is not None or self.config.sampling.backend != "hf"):
            self.gen_sampler().push_weights(weights)  # HF's own sampler shares the in-memory model

    def gen_sampler(self):
        """The configured backend for traces, branching completions and evaluation."""
        s = self.config.sampling
        if self.shared_sampler is not None:
            return self.shared_sampler
        if s.backend == "hf":
            return make_sampler("hf", model=self.m.model, tokenizer=self.m.tokenizer,
                                batch_size=s.batch_size, max_new_tokens=s.max_new_tokens,
                                progress=self.progress)
        if self._gen_sampler is None:
            self._gen_sampler = make_sampler(s.backend, self.m.path, dtype=self.config.model.dtype,
                                             tokenizer=self.m.tokenizer, batch_size=s.batch_size,
                                             max_new_tokens=max(s.max_new_tokens,
                                                                self.config.evaluation.max_new_tokens),
                                             progress=self.progress, max_model_len=4096,
                                             cpu_threads=s.cpu_threads)
        return self._gen_sampler

    def greedy(self, problems: list[Problem], desc: str) -> dict[tuple, bool]:
        return greedy_correct(self.eval_sampler(), problems, self.m.prompt(self.config), desc,
                              self.config.evaluation.max_new_tokens)

    # ---- stages ----------------------------------------------------------------------------
    def data(self) -> Splits:
        c = self.config
        key = stage_key("data", c.data.model_dump())

        def compute(tmp: Path) -> dict:
            problems = load_problems(c)
            write_problems(problems, tmp / "problems.jsonl")
            splits = split_problems(problems, c.data.split_ratios, seed=c.data.seed)
            write_splits(splits, tmp)
            return {"problems": len(problems), "splits": {n: len(p) for n, p in splits.items()},
                    "templates": len({p.id for p in problems})}

        path, meta = self.store.run("data", key, compute)
        self._timed("data", meta)
        self.data_key = key
        parts = {n: load_jsonl(path / f"{n}.jsonl") for n in ("train", "val", "test")}
        return Splits(**parts)

    def base_eval(self, splits: Splits) -> tuple[dict, list]:
        """Greedy correctness of the base model on every split; the template filter from train+val."""
        c = self.config
        key = stage_key("base_eval", self.data_key, c.model.model_dump(), c.evaluation.max_new_tokens)

        def compute(tmp: Path) -> dict:
            for name, problems in splits.items():
                write_jsonl(_correct_rows(self.greedy(problems, f"base greedy ({name})")),
                            tmp / f"{name}_correct.jsonl")
            return {}

        path, meta = self.store.run("base_eval", key, compute)
        self._timed("base_eval", meta)
        self.base_key = key
        correct = {n: _correct_map(_read_jsonl(path / f"{n}_correct.jsonl"))
                   for n in ("train", "val", "test")}
        acc = template_accuracies(splits, {**correct["train"], **correct["val"]})
        kept = select_templates(acc, c.data.template_threshold, c.data.template_min_accuracy)
        if not kept:
            raise LocalizationError(
                f"no template's train+val accuracy lies in [data.template_min_accuracy "
                f"{c.data.template_min_accuracy}, data.template_threshold {c.data.template_threshold}) "
                f"(lowest {min(acc.values()):.2f}, highest {max(acc.values()):.2f}); widen that range "
                f"to train on this model")
        self.template_acc = acc
        return correct, kept

    def traces(self, splits: Splits, kept: list) -> list[Trace]:
        c = self.config
        key = stage_key("traces", self.base_key, c.sampling.model_dump(exclude={"cpu_threads"}),
                        [str(k) for k in kept])  # cores change the speed, not the traces
        problems = [p for p in splits.train if p.id in set(kept)]

        def compute(tmp: Path) -> dict:
            prompt = self.m.prompt(c)
            traces = collect_traces(self.gen_sampler(), problems, [prompt(p.question) for p in problems],
                                    c.sampling.n_samples, c.sampling.temperature, c.sampling.seed,
                                    c.sampling.max_new_tokens)
            write_jsonl([t.to_row() for t in traces], tmp / "traces.jsonl")
            with_contrast = sum(t.contrast_ids is not None for t in traces)
            log.info("traces: %d problems, %d with a contrasting sample", len(traces), with_contrast)
            return {"problems": len(traces), "with_contrast": with_contrast,
                    "greedy_correct": sum(t.greedy_correct for t in traces)}

        path, meta = self.store.run("traces", key, compute)
        self._timed("traces", meta)
        self.traces_key = key
        if meta["with_contrast"] == 0:
            raise LocalizationError(
                f"none of the {meta['problems']} training problems has a sampled trace whose correctness "
                f"differs from greedy ({c.sampling.n_samples} samples at temperature "
                f"{c.sampling.temperature}); raise sampling.n_samples or sampling.temperature")
        return [Trace.from_row(r) for r in _read_jsonl(path / "traces.jsonl")]

    def localization(self, traces: list[Trace]) -> tuple[list[Pivot], dict]:
        c = self.config.localize
        split = {"heldout_fraction", "heldout_seed"}  # the split comes after this stage: see split()
        key = stage_key("localize", self.traces_key, c.model_dump(exclude=split))

        def compute(tmp: Path) -> dict:
            loc = localize(c.method, traces, self.gen_sampler() if c.method != "prefix" else None,
                           self.m.tokenizer, self.config.sampling.max_new_tokens, c.chunk, self.progress)
            pivots = loc.pivots
            if c.max_examples and len(pivots) > c.max_examples:
                pivots = random.Random(0).sample(pivots, c.max_examples)
                loc.dropped["over localize.max_examples"] += len(loc.pivots) - len(pivots)
            write_jsonl([p.to_row() for p in pivots], tmp / "localization.jsonl")
            summary = loc.summary() | {"examples": len(pivots),
                                       "pivot_kinds": pivot_kinds(pivots, self.m.tokenizer)}
            log.info("localisation (%s): %d examples %s, dropped %s", c.method, len(pivots),
                     summary["pivot_kinds"], dict(loc.dropped))
            return summary

        path, meta = self.store.run("localize", key, compute)
        self._timed("localize", meta)
        self.loc_key = key
        if meta["examples"] < c.min_examples:
            raise LocalizationError(
                f"localisation ({c.method}) kept {meta['examples']} examples, below localize.min_examples "
                f"{c.min_examples} (dropped: {meta['dropped']}); sample more (sampling.n_samples, more "
                f"templates via data.template_threshold) or lower localize.min_examples")
        return [Pivot.from_row(r) for r in _read_jsonl(path / "localization.jsonl")], meta

    def split(self, pivots: list[Pivot]) -> tuple[list[Pivot], list[Pivot]]:
        """(train, held-out) pivots (localize.heldout_fraction, seeded): DCM and every update see only
        the train ones; the held-out ones are only measured (pivot diagnostics)."""
        c = self.config.localize
        train, self.heldout = split_pivots(pivots, c.heldout_fraction, c.heldout_seed)
        self.split_key = stage_key("split", self.loc_key, c.heldout_fraction, c.heldout_seed)
        log.info("pivots: %d train, %d held out", len(train), len(self.heldout))
        return train, self.heldout

    def dcm(self, pivots: list[Pivot]) -> tuple[dict[str, torch.Tensor], dict]:
        c = self.config.dcm
        key = stage_key("dcm", self.split_key, c.model_dump(by_alias=True), self.config.model.architecture)

        def compute(tmp: Path) -> dict:
            res: DCMResult = learn_mask(
                self.m.model, _examples(pivots), self.m.tokenizer.pad_token_id, lam=c.lambda_, lr=c.lr,
                epochs=c.epochs, batch_size=c.batch_size, lr_step_epochs=c.lr_step_epochs,
                lr_gamma=c.lr_gamma, early_stop_fraction=c.early_stop_fraction, seed=c.seed,
                architecture=self.config.model.architecture, progress=self.progress)
            save_file({k: v.contiguous() for k, v in res.masks.items()}, str(tmp / "mask.safetensors"))
            summary = res.summary()
            write_json(summary, tmp / "summary.json")
            log.info("DCM: %d of %d components selected (%.2f%%) %s", summary["components_selected"],
                     summary["components_total"], 100 * summary["components_fraction"],
                     summary["selected_per_kind"])
            return {k: summary[k] for k in ("components_selected", "components_total",
                                            "components_fraction", "selected_per_kind", "epochs_run")}

        path, meta = self.store.run("dcm", key, compute)
        self._timed("dcm", meta)
        self.dcm_key = key
        masks = load_file(str(path / "mask.safetensors"))
        return {k: masks[k] for k in KINDS}, meta

    def _validator(self, arm: str, lr: float, val: list[Problem], steps: list[int],
                   pushed: set[str] | None = None):
        """validate(weights) for an update: push the weights to the engine, macro val accuracy, and
        tell on_validation at each scheduled step; ``pushed`` collects the names sent."""
        marks = iter(steps)

        def val_acc(weights: dict[str, torch.Tensor]) -> float:
            self.push(weights)
            if pushed is not None:
                pushed.update(weights)
            correct = self.greedy(val, "val")
            acc = macro_accuracy([(q.id, correct[q.key]) for q in val])
            if self.on_validation is not None:
                self.on_validation({"arm": arm, "lr": lr, "step": next(marks), "val_accuracy": acc})
            return acc

        return val_acc

    def update_run(self, arm: str, selected: dict[str, torch.Tensor], pivots: list[Pivot], lr: float,
                   val: list[Problem]) -> dict:
        """One targeted update (CCA or a random seed) at one lr on the train ``pivots``; stores the
        deltas of the best step (step 0 included) and of the best step >= 1, and the pivot diagnostics
        of both on the train and the held-out pivots (this pipeline's split)."""
        u = self.config.update
        settings = u.model_dump(exclude={"lr", "lr_grid", "random_seeds"})
        key = stage_key("update", self.dcm_key, arm, lr, settings,
                        self.config.evaluation.max_new_tokens)
        name = f"update-{arm}-lr{lr:g}"

        def compute(tmp: Path) -> dict:
            model = self.m.model
            space = component_space(model, self.config.model.architecture)
            rows = selected_rows(model, space, selected, u.kinds)
            val_acc = self._validator(arm, lr, val, validation_steps(u.steps))

            examples, pad = _examples(update_subset(pivots, u.max_examples)), self.m.tokenizer.pad_token_id
            common = dict(lr=lr, steps=u.steps, optimizer=u.optimizer, micro_batch_size=u.micro_batch_size,
                          progress=self.progress, desc=name)
            try:
                if u.zero_stage is None:
                    res = targeted_update(model, RowDeltas(model, rows), examples, pad, val_acc, **common)
                else:
                    from cca_ray.update.zero import zero_targeted_update

                    res = zero_targeted_update(model, rows, examples, pad, val_acc, zero_stage=u.zero_stage,
                                               **common)
            finally:
                params = dict(model.named_parameters())
                self.push({n: params[n] for n in rows})  # the engine back to the base weights
            save_file({f"delta.{i}": d.contiguous() for i, d in enumerate(res.best_deltas)},
                      str(tmp / "best_deltas.safetensors"))
            save_file({f"delta.{i}": d.contiguous() for i, d in enumerate(res.last_deltas)},
                      str(tmp / "last_deltas.safetensors"))
            save_file({f"delta.{i}": d.contiguous() for i, d in enumerate(res.best_updated_deltas)},
                      str(tmp / "best_updated_deltas.safetensors"))
            save_file({n: r for n, r in rows.items()}, str(tmp / "rows.safetensors"))
            write_json(res.history, tmp / "history.json")
            diagnostics = pivot_diagnostics(
                model, rows, {"best": res.best_deltas, "best_updated": res.best_updated_deltas},
                {"train": examples, "held_out": _examples(self.heldout)}, pad, u.micro_batch_size)
            return {"arm": arm, "lr": lr, "best_step": res.best_step, "best_val": res.best_val,
                    "best_updated_step": res.best_updated_step, "best_updated_val": res.best_updated_val,
                    "trainable_parameters": res.trainable_parameters, "pivots": diagnostics}

        path, meta = self.store.run(name, key, compute)
        self._timed("update" if arm == "cca" else "random_control", meta)
        return meta | {"path": str(path)}

    def weights_run(self, method: str, lr: float, p: Prepared) -> dict:
        """One baseline run that changes whole parameters at one lr: full_ft / lora (SFT on the kept
        templates' GSym-Train reference answers) or no_mask (the CCA loss on every parameter). Stores
        the best step's changed weights (LoRA: merged) as best_weights.safetensors."""
        from cca_ray.update.nomask import all_parameter_update
        from cca_ray.update.sft import finetune, sft_examples

        c, s = self.config, self.config.compare.sft
        if method == "no_mask":
            key = stage_key("update", self.split_key, method, lr, c.evaluation.max_new_tokens,
                            c.update.model_dump(include={"steps", "micro_batch_size", "max_examples"}))
            marks = validation_steps(c.update.steps)
        else:
            settings = s.model_dump(exclude={"lora_r", "lora_alpha", "lora_dropout"} if method == "full_ft"
                                    else {"zero_stage"})
            key = stage_key("update", self.base_key, [str(k) for k in p.kept], method, lr, settings,
                            c.evaluation.max_new_tokens)
            marks = sorted(set(range(0, s.steps + 1, s.eval_every)) | {s.steps})
        name = f"update-{method}-lr{lr:g}"
        val = p.splits.val

        def compute(tmp: Path) -> dict:
            model, pad = self.m.model, self.m.tokenizer.pad_token_id
            pushed: set[str] = set()
            val_acc = self._validator(method, lr, val, marks, pushed)

            try:
                if method == "no_mask":
                    examples = _examples(update_subset(p.pivots, c.update.max_examples))
                    res = all_parameter_update(model, examples, pad, val_acc, lr=lr,
                                               steps=c.update.steps, progress=self.progress, desc=name,
                                               micro_batch_size=c.update.micro_batch_size)
                else:
                    kept = set(p.kept)
                    train = [q for q in p.splits.train if q.id in kept]
                    examples = sft_examples(train, self.m.prompt(c), self.m.tokenizer, s.max_length)
                    kind = "full" if method == "full_ft" else "lora"
                    res = finetune(model, examples, pad, val_acc, method=kind, lr=lr, steps=s.steps,
                                   batch_size=s.batch_size, weight_decay=s.weight_decay,
                                   max_grad_norm=s.max_grad_norm, warmup_fraction=s.warmup_fraction,
                                   eval_every=s.eval_every, seed=c.data.seed, lora_r=s.lora_r,
                                   lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                                   zero_stage=s.zero_stage if method == "full_ft" else None,
                                   progress=self.progress, desc=name)
            finally:
                params = dict(model.named_parameters())
                self.push({n: params[n] for n in pushed})  # the engine back to the base weights
            save_file({n: w.contiguous() for n, w in res.best_weights.items()},
                      str(tmp / "best_weights.safetensors"))
            write_json(res.history, tmp / "history.json")
            return {"arm": method, "lr": lr, "best_step": res.best_step, "best_val": res.best_val,
                    "trainable_parameters": res.trainable_parameters,
                    "changed_parameters": res.changed_parameters}

        path, meta = self.store.run(name, key, compute)
        self._timed(method, meta)
        return meta | {"path": str(path)}

    def method_run(self, method: str, lr: float, p: Prepared, selected: dict[str, torch.Tensor] | None = None,
                   seed: int = 0) -> dict:
        """One run of a compared method at one lr (cca and random need CCA's selection)."""
        if method in ("cca", "random"):
            if selected is None:
                raise ValueError(f"method {method!r} needs the DCM selection")
            if method == "cca":
                return self.update_run("cca", selected, p.pivots, lr, p.splits.val)
            sel = random_selection(selected, seed)
            return self.update_run(f"random{seed}", sel, p.pivots, lr, p.splits.val)
        return self.weights_run(method, lr, p)

    @contextlib.contextmanager
    def _applied(self, run: dict, deltas: str = "best"):
        """The base model with this run's best weights in (and pushed to a vLLM engine), restored after:
        rows for cca/random updates (``deltas``: "best" or "best_updated"), whole parameters for the
        baselines."""
        path = Path(run["path"]) / "best_weights.safetensors"
        if not path.is_file():
            with self._merged(run, deltas):
                yield
            return
        weights = load_file(str(path))
        params = dict(self.m.model.named_parameters())
        original = {n: params[n].detach().clone() for n in weights}
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        self.push({n: params[n] for n in weights})
        try:
            yield
        finally:
            with torch.no_grad():
                for n, w in original.items():
                    params[n].copy_(w)
            self.push({n: params[n] for n in weights})

    @contextlib.contextmanager
    def _merged(self, run: dict, deltas: str = "best"):
        """The base model with this run's best rows (``deltas``: "best" or "best_updated") written in
        (and pushed to a vLLM engine), restored afterwards; yields (rows, new row values)."""
        rows = dict(sorted(load_file(str(Path(run["path"]) / "rows.safetensors")).items()))
        saved = load_file(str(Path(run["path"]) / f"{deltas}_deltas.safetensors"))
        deltas = [saved[f"delta.{i}"] for i in range(len(saved))]
        params = dict(self.m.model.named_parameters())
        original = {n: params[n][r].detach().clone() for n, r in rows.items()}
        new = merge_rows(self.m.model, rows, deltas)
        self.push({n: params[n] for n in rows})
        try:
            yield rows, new
        finally:
            with torch.no_grad():
                for n, r in rows.items():
                    params[n][r] = original[n]
            self.push({n: params[n] for n in rows})

    def test_eval(self, name: str, run: dict, test: list[Problem], deltas: str = "best") -> dict[tuple, bool]:
        """Greedy test correctness of this run's best model (``deltas``: "best" or "best_updated")."""
        key = stage_key("test_eval", run["path"], self.config.evaluation.max_new_tokens, deltas)

        def compute(tmp: Path) -> dict:
            with self._applied(run, deltas):
                write_jsonl(_correct_rows(self.greedy(test, f"test ({name})")), tmp / "test_correct.jsonl")
            return {}

        path, meta = self.store.run(f"test-{name}", key, compute)
        self._timed("evaluation", meta)
        return _correct_map(_read_jsonl(path / "test_correct.jsonl"))

    def general(self, name: str, run: dict | None) -> dict:
        e = self.config.evaluation
        key = stage_key("general", self.base_key, run["path"] if run else None, e.model_dump())

        def compute(tmp: Path) -> dict:
            def score():
                return general_scores(self.m.model, self.m.tokenizer, e.general_tasks, e.num_fewshot,
                                      self.m.local_tasks, e.limit)
            if run is None:
                return {"scores": score()}
            with self._applied(run):
                return {"scores": score()}

        _, meta = self.store.run(f"general-{name}", key, compute)
        self._timed("general", meta)
        return meta["scores"]

    def export(self, run: dict) -> dict:
        """The updated model as an HF folder and the sparse row delta, under DIR/cca_model."""
        out = self.out / "cca_model"
        with self._merged(run) as (rows, new):
            self.m.model.save_pretrained(out, safe_serialization=True)
            self.m.tokenizer.save_pretrained(out)
            save_delta(rows, new, self.out / "cca_delta.safetensors", base=self.m.path,
                       extra={"best_step": run["best_step"], "lr": run["lr"]})
        return {"model": str(out), "delta": str(self.out / "cca_delta.safetensors")}

    # ---- the whole run ---------------------------------------------------------------------
    def close(self) -> None:
        """Shut a vLLM engine down (its worker processes would otherwise outlive a failed run)."""
        if self._gen_sampler is not None:
            self._gen_sampler.close()
            self._gen_sampler = None

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.close()

    def prepare(self) -> Prepared:
        """The stages every search trial shares: data, base evaluation and template filter,
        traces, localisation (computed once, then reused from the stage store)."""
        splits = self.data()
        correct, kept = self.base_eval(splits)
        traces = self.traces(splits, kept)
        pivots, loc_meta = self.localization(traces)
        train, heldout = self.split(pivots)
        return Prepared(splits, correct, kept, train, loc_meta, heldout)

    def best_update(self, arm: str, selected: dict[str, torch.Tensor], p: Prepared) -> tuple[dict, list]:
        """The update at every lr of the grid; the best by validation (ties: the smaller lr)."""
        runs = [self.update_run(arm, selected, p.pivots, lr, p.splits.val) for lr in self.config.update.lrs]
        return best_run(runs), runs

    def _run(self) -> dict:
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(c))
        start = time.perf_counter()
        _ = self.m  # an unsupported architecture or a missing model fails before any stage
        prep = self.prepare()
        masks, dcm_meta = self.dcm(prep.pivots)
        selected = {k: m > 0.5 for k, m in masks.items()}
        _, cca_runs = self.best_update("cca", selected, prep)
        random_runs = [self.best_update(f"random{seed}", random_selection(selected, seed), prep)[1]
                       for seed in range(c.update.random_seeds)]
        report = self.final_report(prep, dcm_meta, cca_runs, random_runs)
        report["timings"]["total_this_invocation"] = round(time.perf_counter() - start, 1)
        write_report(report, self.out)
        log.info("stages reused: %s; computed: %s", self.store.reused, self.store.computed)
        return report

    def arm_result(self, name: str, runs: list[dict], test: list[Problem]) -> ArmResult:
        """One arm's chosen run and best updated run (best val at a step >= 1) over its lr grid, each
        evaluated on test (once, when both are the same model)."""
        best, updated = best_run(runs), best_run(runs, updated=True)
        best_test = self.test_eval(name, best, test)
        same = updated["path"] == best["path"] and updated["best_updated_step"] == best["best_step"]
        updated_test = best_test if same else self.test_eval(f"{name}-updated", updated, test, "best_updated")
        return ArmResult(runs, best, updated, best_test, updated_test)

    def final_report(self, prep: Prepared, dcm_meta: dict, cca_runs: list[dict],
                     random_runs: list[list[dict]]) -> dict:
        """Test evaluation of the chosen and the best updated runs (CCA's lr grid, and each random
        seed's), the general suite before/after, the export and report.json's content (the test
        split is touched only here)."""
        test = prep.splits.test
        cca = self.arm_result("cca", cca_runs, test)
        randoms = [self.arm_result(f"random{s}", runs, test) for s, runs in enumerate(random_runs)]
        general = general_deltas(self.general("base", None), self.general("cca", cca.best))
        exported = self.export(cca.best)
        space = component_space(self.m.model, self.config.model.architecture)
        return build_report(self.config, self.m, prep, self.template_acc, dcm_meta, space, cca, randoms,
                            general, self.timings, exported)


@dataclass
class Prepared:
    """What the shared stages produced: splits, base correctness, kept templates, the train pivots
    (``pivots``, all that DCM and the updates see) and the held-out ones."""

    splits: Splits
    correct: dict
    kept: list
    pivots: list[Pivot]
    loc_meta: dict
    heldout: list[Pivot]


@dataclass
class ArmResult:
    """One arm (CCA or a random seed): its runs over the lr grid, the chosen run (best val, step 0
    included), the best updated run (best val at a step >= 1), and their test correctness."""

    runs: list[dict]
    best: dict
    updated: dict
    test: dict[tuple, bool]
    updated_test: dict[tuple, bool]


def best_run(runs: list[dict], updated: bool = False) -> dict:
    """The run with the best validation (ties: the smaller lr); ``updated``: by its best step >= 1."""
    field = "best_updated_val" if updated else "best_val"
    return max(runs, key=lambda r: (r[field], -r["lr"]))


def update_subset(pivots: list[Pivot], max_examples: int | None) -> list[Pivot]:
    """The train pivots an update steps on: all, or a seeded subset of ``max_examples`` (in their
    order). DCM learns its mask on every train pivot; each update step is a full-batch pass, so a
    subset keeps it affordable."""
    if not max_examples or len(pivots) <= max_examples:
        return pivots
    keep = set(random.Random(0).sample(range(len(pivots)), max_examples))
    return [p for i, p in enumerate(pivots) if i in keep]


def random_selection(selected: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same number of components of each kind as `selected`, drawn uniformly over all layers."""
    g = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for kind, sel in selected.items():
        flat = torch.zeros(sel.numel(), dtype=torch.bool)
        flat[torch.randperm(sel.numel(), generator=g)[: int(sel.sum())]] = True
        out[kind] = flat.view_as(sel)
    return out


def _ordered(test: list[Problem], correct: dict[tuple, bool]) -> list[bool]:
    return [correct[p.key] for p in test]


def _p(test: list[Problem], a: dict[tuple, bool], b: dict[tuple, bool]) -> float:
    """Exact McNemar p of two models' per-problem test correctness."""
    return mcnemar_p(_ordered(test, a), _ordered(test, b))


def val_curves(runs: list[dict]) -> dict[str, list[list]]:
    """lr -> [[step, val_accuracy], ...] of each run, read from its stored history."""
    out = {}
    for r in sorted(runs, key=lambda r: r["lr"]):
        history = json.loads((Path(r["path"]) / "history.json").read_text())
        out[f"{r['lr']:g}"] = [[h["step"], h["val_accuracy"]] for h in history if "val_accuracy" in h]
    return out


def _best_updated(arm: ArmResult, test: list[Problem], base_test: dict, n_params: int) -> dict:
    """report.json's best_updated entry of one arm: the best validated step >= 1 on test."""
    r, acc = arm.updated, accuracy_report(test, arm.updated_test)["accuracy"]
    return {"step": r["best_updated_step"], "lr": r["lr"], "val_accuracy": r["best_updated_val"],
            "test_accuracy": acc, "delta_vs_base": acc - accuracy_report(test, base_test)["accuracy"],
            "p_value_vs_base": _p(test, arm.updated_test, base_test),
            "params_changed": r["trainable_parameters"],
            "params_changed_fraction": r["trainable_parameters"] / n_params}


def _pivot_entry(arm: ArmResult) -> dict:
    """Pivot diagnostics of an arm's chosen step and of its best updated step."""
    b, u = arm.best, arm.updated
    return {"lr": b["lr"], "step": b["best_step"], **b["pivots"]["best"],
            "best_updated": {"lr": u["lr"], "step": u["best_updated_step"], **u["pivots"]["best_updated"]}}


def pivots_report(c: CCAConfig, prep: Prepared, cca: ArmResult, randoms: list[ArmResult]) -> dict:
    """report.json's pivots: split sizes, and the logit-difference statistics of the base, CCA and each
    random seed on the train and the held-out pivots."""
    return {"train": len(prep.pivots), "held_out": len(prep.heldout),
            "heldout_fraction": c.localize.heldout_fraction, "seed": c.localize.heldout_seed,
            "base": cca.best["pivots"]["base"], "cca": _pivot_entry(cca),
            "random": [{"seed": s} | _pivot_entry(a) for s, a in enumerate(randoms)]}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def build_report(c: CCAConfig, m: Loaded, prep: Prepared, template_acc: dict, dcm_meta: dict, space,
                 cca: ArmResult, randoms: list[ArmResult], general: dict, timings: dict,
                 exported: dict) -> dict:
    """report.json: the fields the issue names, fractions in [0, 1]."""
    splits, correct, kept, loc_meta = prep.splits, prep.correct, prep.kept, prep.loc_meta
    test, base_test, best_cca = splits.test, prep.correct["test"], cca.best
    base_rep = accuracy_report(test, base_test)
    cca_rep = accuracy_report(test, cca.test)
    rand_reps = [accuracy_report(test, a.test) for a in randoms]
    base_v = [correct["val"][p.key] for p in splits.val]
    selected = dcm_meta["components_selected"]
    n_params = sum(p.numel() for p in m.model.parameters())
    changed = best_cca["trainable_parameters"] if best_cca["best_step"] > 0 else 0
    p_rand = [_p(test, cca.test, a.test) for a in randoms]
    rand_updated = [_best_updated(a, test, base_test, n_params) for a in randoms]
    cca_updated = _best_updated(cca, test, base_test, n_params)
    p_rand_updated = [_p(test, cca.updated_test, a.updated_test) for a in randoms]
    cca_updated |= {"p_value_vs_random": max(p_rand_updated) if p_rand_updated else None,
                    "p_values_vs_each_random_seed": p_rand_updated}
    return {
        "model": m.path if c.model.name != BUILTIN else f"builtin ({m.path})",
        "config": c.model_dump(by_alias=True),
        "data": {"train": len(splits.train), "val": len(splits.val), "test": len(test),
                 "templates_kept": [str(k) for k in kept], "template_threshold": c.data.template_threshold,
                 "template_min_accuracy": c.data.template_min_accuracy,
                 "template_filter_measured_on": "train+val only (test untouched)",
                 "template_trainval_accuracy": {str(k): v for k, v in template_acc.items()}},
        "base": {"val_accuracy": macro_accuracy(list(zip([p.id for p in splits.val], base_v, strict=True))),
                 "test_accuracy": base_rep["accuracy"], "per_template_test": base_rep["per_template"]},
        "cca": {"val_accuracy": best_cca["best_val"], "test_accuracy": cca_rep["accuracy"],
                "lambda": c.dcm.lambda_, "lr": best_cca["lr"], "best_step": best_cca["best_step"],
                "kinds_updated": list(c.update.kinds), "optimizer": c.update.optimizer,
                "components_selected": selected, "components_total": space.total,
                "components_fraction": selected / space.total,
                "selected_per_kind": dcm_meta["selected_per_kind"],
                "params_changed": changed, "params_changed_fraction": changed / n_params,
                "p_value_vs_base": _p(test, cca.test, base_test),
                "p_value_vs_random": max(p_rand) if p_rand else None,
                "p_values_vs_each_random_seed": p_rand,
                "delta_vs_base": cca_rep["accuracy"] - base_rep["accuracy"],
                "lr_search": [{"lr": r["lr"], "best_val": r["best_val"], "best_step": r["best_step"],
                               "best_updated_val": r["best_updated_val"],
                               "best_updated_step": r["best_updated_step"]} for r in cca.runs],
                "best_updated": cca_updated, "val_curves": val_curves(cca.runs),
                "per_template_test": cca_rep["per_template"]},
        "random_control": {"test_accuracy": _mean([r["accuracy"] for r in rand_reps]),
                           "best_updated": {key: _mean([u[key] for u in rand_updated])
                                            for key in ("val_accuracy", "test_accuracy")},
                           "seeds": [{"seed": s, "test_accuracy": rep["accuracy"],
                                      "val_accuracy": a.best["best_val"],
                                      "lr": a.best["lr"], "best_step": a.best["best_step"],
                                      "best_updated": u, "val_curves": val_curves(a.runs)}
                                     for s, (rep, a, u) in enumerate(zip(rand_reps, randoms, rand_updated,
                                                                         strict=True))]},
        "pivots": pivots_report(c, prep, cca, randoms),
        "localization": {"method": loc_meta["method"], "examples": loc_meta["examples"],
                         "dropped": loc_meta["dropped"],
                         "generated_tokens": loc_meta.get("generated_tokens"),
                         "pivot_kinds": loc_meta.get("pivot_kinds")},
        "general": general,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "exports": exported,
    }
