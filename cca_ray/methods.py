"""The methods a run or a comparison trains, in one table: name -> what it trains on, how one run at
one lr is made, its validation schedule and its lr range. Adding a method is one row here (and its
lr range in config.MethodRanges); everything else looks methods up by name. Words: a method's
*name* is its key here; an *arm* is one series of its runs (random's carry their seed: random0)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cca_ray.config import CCAConfig, Range

CCA, RANDOM, FULL_FT, LORA, NO_MASK = "cca", "random", "full_ft", "lora", "no_mask"


@dataclass(frozen=True)
class Method:
    """One row: ``run(pipe, prep, lr, mask, seed)`` makes (or reuses) one run and returns its meta;
    ``needs_mask``: it trains on DCM's selection (or one of its size), so DCM runs first."""

    name: str
    label: str
    needs_mask: bool
    timing: str  # report.json's timings bucket
    run: Callable[..., dict]
    schedule: Callable[[CCAConfig], list[int]]

    def lr_range(self, c: CCAConfig) -> Range:
        """The lr range Tune searches for this method (cca and random default to tune.lr)."""
        return getattr(c.compare.lr, self.name) or c.tune.lr

    def arm(self, seed: int = 0) -> str:
        """The run's name in stage folders and reports: random runs carry their seed."""
        return f"{self.name}{seed}" if self.name == RANDOM else self.name

    def seeds(self, c: CCAConfig) -> list[int]:
        """The seeds a comparison evaluates (random: every update.random_seeds; the others: one)."""
        return list(range(max(1, c.update.random_seeds))) if self.name == RANDOM else [0]


def _update_marks(c: CCAConfig) -> list[int]:
    from cca_ray.update.loop import schedule

    return schedule(c.update.steps)


def _sft_marks(c: CCAConfig) -> list[int]:
    from cca_ray.update.loop import schedule

    return schedule(c.compare.sft.steps, c.compare.sft.eval_every)


# the run functions import the pipeline when called: this table stays importable by config-level code


def _cca(pipe: Any, prep: Any, lr: float, mask: Any, seed: int = 0) -> dict:
    from cca_ray.pipeline.updates import rows_run

    return rows_run(pipe, CCA, CCA, mask.selected, mask, prep, lr)


def _random(pipe: Any, prep: Any, lr: float, mask: Any, seed: int = 0) -> dict:
    from cca_ray.pipeline.updates import rows_run
    from cca_ray.update.control import random_selection

    return rows_run(pipe, RANDOM, f"{RANDOM}{seed}", random_selection(mask.selected, seed), mask, prep, lr)


def _full_ft(pipe: Any, prep: Any, lr: float, mask: Any = None, seed: int = 0) -> dict:
    from cca_ray.pipeline.updates import sft_run

    return sft_run(pipe, FULL_FT, lr, prep, lora=False)


def _lora(pipe: Any, prep: Any, lr: float, mask: Any = None, seed: int = 0) -> dict:
    from cca_ray.pipeline.updates import sft_run

    return sft_run(pipe, LORA, lr, prep, lora=True)


def _no_mask(pipe: Any, prep: Any, lr: float, mask: Any = None, seed: int = 0) -> dict:
    from cca_ray.pipeline.updates import nomask_run

    return nomask_run(pipe, NO_MASK, lr, prep)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method(CCA, "CCA", True, "update", _cca, _update_marks),
    Method(RANDOM, "random components", True, "random_control", _random, _update_marks),
    Method(FULL_FT, "full fine-tuning", False, FULL_FT, _full_ft, _sft_marks),
    Method(LORA, "LoRA", False, LORA, _lora, _sft_marks),
    Method(NO_MASK, "no mask (all parameters)", False, NO_MASK, _no_mask, _update_marks),
)}


def method(name: str) -> Method:
    """The table's row for ``name``; an unknown name is an error that lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]
