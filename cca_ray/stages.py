"""On-disk stage artifacts keyed by their inputs: a stage whose folder exists is reused, one that
is missing is computed into a temp folder and renamed into place whole, so a killed run resumes
at the first missing stage and never reads a half-written artifact."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from cca_ray.io import write_json

log = logging.getLogger("cca_ray")


def stage_key(*parts: Any) -> str:
    """A short content hash of whatever determines a stage's output (config parts, upstream keys,
    and the package version, so an upgraded cca-ray never reuses an older version's artifacts)."""
    from cca_ray import __version__

    blob = json.dumps([__version__, *parts], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageStore:
    """Folders DIR/stages/<name>-<key>/ each with a meta.json written last."""

    def __init__(self, root: str | Path):
        self.root = Path(root) / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.reused: list[str] = []
        self.computed: list[str] = []

    def path(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key}"

    def meta(self, name: str, key: str) -> dict | None:
        f = self.path(name, key) / "meta.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def run(self, name: str, key: str, compute: Callable[[Path], dict | None]) -> tuple[Path, dict]:
        """Reuse the stage's folder, or call compute(tmp_dir) -> meta and publish it atomically.

        The meta (with the stage's seconds) is what later reports read, so a resumed run reports
        the same numbers as an uninterrupted one.
        """
        final = self.path(name, key)
        meta = self.meta(name, key)
        if meta is None:
            # processes sharing the store (Tune trials with the same lambda) compute a stage once:
            # the one holding the lock computes, the others wait and reuse its folder
            locks = self.root / ".locks"  # beside, not among, the stage folders
            locks.mkdir(exist_ok=True)
            with FileLock(str(locks / f"{final.name}.lock")):
                meta = self.meta(name, key)
                if meta is None:
                    return final, self._compute(name, key, final, compute)
        log.info("stage %s: reused %s", name, final)
        self.reused.append(name)
        return final, meta

    def _compute(self, name: str, key: str, final: Path, compute: Callable[[Path], dict | None]) -> dict:
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log.info("stage %s: computing -> %s", name, final)
        start = time.perf_counter()
        meta = dict(compute(tmp) or {})
        meta.update(stage=name, key=key, seconds=round(time.perf_counter() - start, 2))
        write_json(meta, tmp / "meta.json")  # last: a folder without it is not a finished stage
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        self.computed.append(name)
        log.info("stage %s: done in %.1f s", name, meta["seconds"])
        return meta
