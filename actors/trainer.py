"""TrainerActor: one model in memory, DeepSpeed initialised when the config asks for ZeRO; runs the
trial's DCM (mask cached per lambda in the shared stage store) and one method's run, streaming
every validation back to the Tune trial that drives it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from cca_ray.config import parse_config
from cca_ray.logs import log_to
from cca_ray.methods import CCA, method
from cca_ray.pipeline import evaluate
from cca_ray.pipeline.run import Pipeline
from cca_ray.pipeline.updates import validations


class Trainer:
    """The trainer role (plain class; TrainerActor is its Ray actor)."""

    def __init__(self, config: dict, out: str, sampler: Any = None):
        from actors.sampler import SamplerClient

        log_to(Path(out) / "run.log")
        c = parse_config(config)
        if c.update.zero_stage is not None:
            from cca_ray.update.deepspeed import deepspeed_env, init_distributed

            deepspeed_env()
            init_distributed()
        self.pipe = Pipeline(c, out, progress=False, sampler=SamplerClient(sampler) if sampler else None)
        self.prep = self.pipe.prepare()  # reused from the store: the model's job computed it once
        self.mask = None

    def dcm(self) -> dict:
        """The mask for this config's lambda (computed by the first trial that needs it)."""
        self.mask = self.pipe.dcm(self.prep)
        return self.mask.meta

    def update(self, name: str = CCA, lr: float | None = None) -> Iterator[dict]:
        """Runs one method (methods.py) at lr (None: update.lr); yields {"kind": "validation", step,
        val_accuracy} as it validates, then {"kind": "final", ...the run's meta, path}. A reused run
        replays its stored history."""
        if self.mask is None and method(name).needs_mask:
            self.dcm()
        lr = self.pipe.config.update.lr if lr is None else lr
        events: queue.Queue = queue.Queue()
        self.pipe.on_validation = events.put
        outcome: dict = {}

        def work() -> None:
            try:
                outcome["run"] = self.pipe.method_run(name, lr, self.prep, self.mask)
            except BaseException as exc:  # re-raised in the actor's thread below
                outcome["error"] = exc
            finally:
                events.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        streamed = 0
        while (event := events.get()) is not None:
            streamed += 1
            yield {"kind": "validation", **event}
        thread.join()
        self.pipe.on_validation = None
        if "error" in outcome:
            raise outcome["error"]
        run = outcome["run"]
        if not streamed:
            for step, acc in validations(run):
                yield {"kind": "validation", "arm": name, "lr": run["lr"], "step": step, "val_accuracy": acc,
                       "replayed": True}
        yield {"kind": "final", **run}

    def general_deltas(self, run: dict, name: str = CCA) -> dict:
        """lm-eval before/after for this run's best step (the objective's regression penalty)."""
        return evaluate.general_change(self.pipe, method(name).arm(), self.prep.base_key, run)


TrainerActor = ray.remote(Trainer)
