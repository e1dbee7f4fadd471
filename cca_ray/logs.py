"""Logging for every entry point: one "cca_ray" logger that writes to stdout and/or a run's log
file, so decisions (stage reuse, examples kept, trials) land in one place per run."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOGGER = "cca_ray"


def setup_logging(out: str | Path | None = None, name: str = "run.log",
                  stdout: bool = True) -> logging.Logger:
    """The cca_ray logger at INFO, to stdout and (with ``out``) to OUT/name, appended across resumes;
    earlier handlers are replaced (a command sets logging up once)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)] if stdout else []
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(out) / name))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def log_to(path: str | Path) -> None:
    """Also append the cca_ray logger's records to this file (once per process and path): every
    actor of a model writes its decisions into the model's run.log."""
    path = str(Path(path).resolve())
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    if any(getattr(h, "baseFilename", None) == path for h in logger.handlers):
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [pid {os.getpid()}] %(message)s"))
    logger.addHandler(handler)
