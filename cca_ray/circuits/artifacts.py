"""The circuits system's artifacts under OUT, one StageStore stage each, keyed by exactly the config
sections it depends on, so a changed setting recomputes what it affects and nothing else:

  data-<key>                 corpus                                tokenizer.json, tokens.safetensors
  model-<variant>-<key>      data + model + train + the variant    weights.safetensors, model.json
  means-<variant>-<key>      model + prune.mean_windows, prune.seed  means.safetensors

(pruning stages: see run.py). A trained model's checkpoints live in OUT/checkpoints/ while it
trains, outside the stage's temporary folder, so a killed training resumes where it stopped.
Everything a Tune trial needs (the model, its means, a task's pairs, one pruning) is here, so
run.py and search.py share it instead of importing each other.

Reproducible: training, the means, the bridges (train.threads) and every pruning (search.trial.threads)
run in a freshly spawned process with pinned kernels and threads (cca_ray.tiny.determinism), so the
same config gives the same models and circuits on machines of one kind (what determinism.py pins; an
Intel and an AMD machine may still differ in MKL's matmuls).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from safetensors.torch import load_file

from cca_ray.circuits.config import CircuitsConfig
from cca_ray.circuits.model import NODE_KINDS
from cca_ray.io import write_json, write_safetensors
from cca_ray.logs import LOGGER
from cca_ray.stages import StageStore, stage_key
from cca_ray.tiny.determinism import deterministic_env, run_deterministic

log = logging.getLogger(__name__)

# train settings that change how often a run saves, not what it learns
_TRAIN_UNKEYED = {"checkpoint_every"}


class Artifacts:
    """The stages of one circuits config in OUT: their keys, and each one reused or computed."""

    def __init__(self, config: CircuitsConfig, out: str | Path):
        self.c, self.out = config, Path(out)
        self.store = StageStore(self.out)
        self._data = None

    # ---- keys: pure functions of the config --------------------------------------------------
    @property
    def data_key(self) -> str:
        return stage_key("circuits-data", self.c.corpus.model_dump())

    def model_key(self, variant: str) -> str:
        """data + model + train + the variant, and a matched-loss variant's reference model."""
        c = self.c
        v = c.variant(variant)
        ref = self.model_key(v.match_loss_of) if v.match_loss_of else None
        return stage_key("circuits-model", self.data_key, c.model.model_dump(),
                         c.train.model_dump(exclude=_TRAIN_UNKEYED), v.model_dump(exclude_none=True), ref)

    def means_key(self, variant: str) -> str:
        """The model, the corpus windows and seed, and the node locations (each one gets a mean)."""
        p = self.c.prune
        return stage_key("circuits-means", self.model_key(variant), p.mean_windows, p.seed, NODE_KINDS)

    def prune_key(self, variant: str, task: str, searched: bool) -> str:
        """A circuit's pruning: the model, the whole prune section, the task, and the search section
        when the hyperparameters are searched (a trial's CPUs and GPUs change speed, not results), and
        the threads any pruning runs with (search.trial.threads, unset: 1), which change results."""
        c = self.c
        search = c.search.model_dump(exclude={"trial", "max_concurrent_searches"}) if searched else None
        return stage_key("circuits-prune", self.means_key(variant), c.prune.model_dump(), task, search,
                         self.trial_threads)

    def bridges_key(self) -> str:
        """The bridges: both models, the bridges section, and the held-out task pairs they are checked on."""
        c, b, p = self.c, self.c.bridges, self.c.prune
        return stage_key("circuits-bridges", self.model_key(b.dense), self.model_key(b.sparse),
                         b.model_dump(), c.tasks, p.seed, p.test_pairs, p.distractors)

    def circuit_dir(self, variant: str, task: str) -> Path:
        """Where users look for a circuit: OUT/circuits/<variant>/<task>/ (copied from its stages)."""
        return self.out / "circuits" / variant / task

    # ---- stages -------------------------------------------------------------------------------
    def data_dir(self) -> Path:
        """The corpus stage's folder, built once per corpus config (nothing loaded)."""
        path, _ = self.store.run("data", self.data_key, self._make_data)
        return path

    def data(self):
        """(tokenizer, train tokens, val tokens), built once per corpus config."""
        if self._data is None:
            from cca_ray.circuits.tokenizer import load_tokenizer

            path = self.data_dir()
            tokens = load_file(str(path / "tokens.safetensors"))
            self._data = load_tokenizer(path / "tokenizer.json"), tokens["train"], tokens["val"]
        return self._data

    def _make_data(self, tmp: Path) -> dict:
        from cca_ray.circuits.corpus import generate_corpus
        from cca_ray.circuits.tokenizer import encode_docs, save_tokenizer, train_tokenizer

        s = self.c.corpus
        docs = generate_corpus(s.train_docs + s.val_docs, s.seed)
        train_docs, val_docs = docs[:s.train_docs], docs[s.train_docs:]
        tok = train_tokenizer(train_docs, s.vocab_size, opening_tokens=s.opening_tokens)
        train, val = encode_docs(tok, train_docs), encode_docs(tok, val_docs)
        save_tokenizer(tok, tmp / "tokenizer.json")
        write_safetensors({"train": train, "val": val}, tmp / "tokens.safetensors")
        log.info("corpus: %d train docs (%d tokens), %d val docs (%d tokens), vocab %d",
                 len(train_docs), len(train), len(val_docs), len(val), tok.get_vocab_size())
        return {"train_tokens": len(train), "val_tokens": len(val), "vocab_size": tok.get_vocab_size()}

    def train(self, variant: str, progress: bool = True, alone: bool = True) -> Path:
        """Train one variant (or reuse it); returns its stage folder. ``alone``: nothing else computes
        meanwhile, so its threads may spin while they wait (see _pinned)."""
        name, key = f"model-{variant}", self.model_key(variant)
        ckpt = self.out / "checkpoints" / f"{name}-{key}"

        v = self.c.variant(variant)
        stop = None
        if v.match_loss_of:  # the reference first: its final val loss is where this one stops
            self.train(v.match_loss_of, progress, alone)
            stop = self.model_meta(v.match_loss_of)["val_loss"]

        def compute(tmp: Path) -> dict:
            self._pinned(_train_entry, variant, stop, str(tmp), str(ckpt), progress, spin=alone)
            return {"variant": variant, "l0_target": v.l0_target, "stop_at_loss": stop}

        path, _ = self.store.run(name, key, compute)
        shutil.rmtree(ckpt, ignore_errors=True)  # the model is published: its checkpoint is spent
        try:
            ckpt.parent.rmdir()  # OUT/checkpoints, once no model is training
        except OSError:
            pass
        return path

    def trained(self, variant: str) -> bool:
        return self.store.meta(f"model-{variant}", self.model_key(variant)) is not None

    def model_dir(self, variant: str) -> Path:
        """The trained variant's stage folder; a clear error naming the fix when there is none."""
        if not self.trained(variant):
            raise FileNotFoundError(f"{self.out}: variant {variant!r} is not trained for this config; run "
                                    f"`cca-ray circuits train --out {self.out}` first")
        return self.store.path(f"model-{variant}", self.model_key(variant))

    def model_meta(self, variant: str) -> dict | None:
        """The trained variant's model.json (spec, loss history, val loss, nonzero fraction), or None."""
        if not self.trained(variant):
            return None
        return json.loads((self.model_dir(variant) / "model.json").read_text())

    def load(self, variant: str):
        """(model, means) of a trained variant; the means over the corpus are computed once."""
        from cca_ray.circuits.train import load_model

        model = load_model(self.model_dir(variant))
        p = self.c.prune

        def compute(tmp: Path) -> dict:
            self._pinned(_means_entry, variant, str(tmp))
            return {"variant": variant, "windows": p.mean_windows}

        path, _ = self.store.run(f"means-{variant}", self.means_key(variant), compute)
        return model, load_file(str(path / "means.safetensors"))

    def bridged(self) -> bool:
        """Whether this config has bridges: enabled, and both of their variants in it."""
        b = self.c.bridges
        return b.enabled and {b.dense, b.sparse} <= {v.name for v in self.c.variants}

    def bridges(self, progress: bool = True) -> dict | None:
        """Train (or reuse) the bridges between the config's dense and sparse variants and check them
        on every task's held-out pairs; None when disabled or either variant is not in the config."""
        b = self.c.bridges
        if not self.bridged():
            return None

        def compute(tmp: Path) -> dict:
            self._pinned(_bridges_entry, str(tmp), progress)
            return {"dense": b.dense, "sparse": b.sparse}

        self.store.run("bridges", self.bridges_key(), compute)
        return self.stored_bridges()

    def stored_bridges(self) -> dict | None:
        """The finished bridges stage's bridges.json (history, per-task check), or None."""
        if not self.bridged() or self.store.meta("bridges", self.bridges_key()) is None:
            return None
        return json.loads((self.store.path("bridges", self.bridges_key()) / "bridges.json").read_text())

    # ---- pruning (no stage of its own: a Tune trial runs one of many) ---------------------------
    def task_sets(self, tok, task: str, n_ctx: int):
        """Train / val / test minimal pairs of a task (disjoint seeds, same for every model)."""
        from cca_ray.circuits.tasks import make_task

        p = self.c.prune
        return tuple(make_task(task, tok, n, p.seed * 1000 + i, n_ctx, distractors=p.distractors)
                     for i, n in enumerate((p.train_pairs, p.val_pairs, p.test_pairs)))

    def prune_one(self, variant: str, task: str, params: dict | None = None, progress: bool = False) -> dict:
        """Prune one (model, task) with the config's hyperparameters, `params` overriding some (in a
        pinned child process with search.trial.threads threads)."""
        if self.store.meta(f"means-{variant}", self.means_key(variant)) is None:
            self.load(variant)  # the means stage, before the child reads it
        return self._pinned(Artifacts.prune_here, variant, task, params or {}, progress,
                            threads=self.trial_threads)

    def prune_here(self, variant: str, task: str, params: dict, progress: bool = False) -> dict:
        """prune_one's work, in this process."""
        from cca_ray.circuits.prune import prune

        model, means = self.load(variant)
        tok, _, _ = self.data()
        train, val, test = self.task_sets(tok, task, model.spec.n_ctx)
        result = prune(model, means, train, val, test, self.c.prune.spec(**params), progress)
        return {"variant": variant, "task": task, **result}

    @property
    def trial_threads(self) -> int:
        """The threads one pruning runs with (search.trial.threads; unset: 1)."""
        return self.c.search.trial.threads or 1

    def _pinned(self, entry, *args, threads: int | None = None, spin: bool = True):
        """entry(self-like Artifacts, *args) in a spawned process with deterministic kernels and
        `threads` (default train.threads) threads. With ``spin`` its idle OpenMP threads spin instead of
        sleeping (no numerical effect; 1.4x faster training here, measured), which is right only when no
        other job shares the cores: concurrent Ray trainings pass spin=False."""
        threads = threads or self.c.train.threads
        self.data_dir()  # every child reads the corpus: its stage first, built once
        return run_deterministic(_child, entry, self.c.model_dump(mode="json"), str(self.out), _echo(), *args,
                                 threads=threads, env=deterministic_env(threads, spin=spin))


# ---- the pinned children's entries (module level: a spawned process imports them) -------------------
def _child(entry, config: dict, out: str, echo: bool, *args):
    """A pinned child's main: the parent's logging (OUT/run.log, and the console when the parent's log
    goes there), then entry(Artifacts of the config, *args)."""
    from cca_ray.logs import log_to, setup_logging

    if echo:
        setup_logging(out)
    else:
        log_to(Path(out) / "run.log")
    return entry(Artifacts(CircuitsConfig.model_validate(config), out), *args)


def _echo() -> bool:
    """Whether this process's cca_ray log reaches the console."""
    return any(type(h) is logging.StreamHandler for h in logging.getLogger(LOGGER).handlers)


def _train_entry(a: Artifacts, variant: str, stop: float | None, tmp: str, ckpt: str, progress: bool) -> None:
    from cca_ray.circuits.train import train

    tok, train_tokens, val_tokens = a.data()
    train(a.c.model.spec(tok.get_vocab_size()), a.c.train.spec(a.c.variant(variant).l0_target, stop),
          train_tokens, val_tokens, Path(tmp), progress, checkpoint=ckpt)


def _means_entry(a: Artifacts, variant: str, tmp: str) -> None:
    from cca_ray.circuits.prune import node_means
    from cca_ray.circuits.train import load_model

    _, train_tokens, _ = a.data()
    p = a.c.prune
    write_safetensors(node_means(load_model(a.model_dir(variant)), train_tokens, p.mean_windows, seed=p.seed),
                      Path(tmp) / "means.safetensors")


def _bridges_entry(a: Artifacts, tmp: str, progress: bool) -> None:
    from cca_ray.circuits.bridges import bridged_task_losses, train_bridges
    from cca_ray.circuits.train import load_model

    b = a.c.bridges
    dense, sparse = (load_model(a.model_dir(n)) for n in (b.dense, b.sparse))
    tok, train_tokens, _ = a.data()
    bridges, history = train_bridges(dense, sparse, train_tokens, b.spec(), progress)
    write_safetensors(bridges.state_dict(), Path(tmp) / "bridges.safetensors")
    n_ctx = dense.spec.n_ctx
    tasks = {t: bridged_task_losses(bridges, dense, sparse, a.task_sets(tok, t, n_ctx)[2]) for t in a.c.tasks}
    write_json({"dense": b.dense, "sparse": b.sparse, "spec": b.spec().to_dict(), "history": history,
                "final": history[-1] if history else None, "task_loss": tasks}, Path(tmp) / "bridges.json")


def objective(result: dict) -> float:
    """What the search minimises: circuit nodes when the target is reached and the circuit passes the
    held-out checks (sufficient and necessary); a reached circuit that fails them ranks after every
    passing one, and a trial that misses the target after both."""
    total = float(result["total_nodes"])
    if result.get("reached"):
        passes = result.get("sufficient", True) and result.get("necessary", True)
        return float(result["n_nodes"]) + (0.0 if passes else total)
    return 2 * total + 1.0 + min(float(result.get("task_loss") or math.inf), 1e3)
