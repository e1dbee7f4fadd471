"""Atomic artifact writers: a crash mid-write never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def checkpoint_reader(model_dir: str | Path):
    """name -> tensor from an HF folder's safetensors (single file or sharded index), read lazily:
    one tensor at a time, e.g. to restore a few base weights without loading the model. A hub id
    reads the local snapshot (the one the engine loaded; fetched if missing). ``read.shape(name)``
    gives a tensor's shape without reading it."""
    from safetensors import safe_open

    if not Path(model_dir).is_dir():
        from huggingface_hub import snapshot_download

        model_dir = snapshot_download(str(model_dir), allow_patterns=["*.safetensors", "*.json"])
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    where = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else dict.fromkeys(_safetensors_keys(model_dir / "model.safetensors"), "model.safetensors"))

    def read(name: str):
        if name not in where:
            raise KeyError(f"{name} is not in the checkpoint at {model_dir}")
        with safe_open(str(model_dir / where[name]), framework="pt") as f:
            return f.get_tensor(name)

    @functools.cache
    def shape(name: str) -> list[int]:
        """The tensor's shape, from the file's header (nothing read; asked once per name)."""
        if name not in where:
            raise KeyError(f"{name} is not in the checkpoint at {model_dir}")
        with safe_open(str(model_dir / where[name]), framework="pt") as f:
            return list(f.get_slice(name).get_shape())

    read.shape = shape  # type: ignore[attr-defined]
    return read


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no safetensors checkpoint (save the model with safe_serialization)")
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def atomic_write(path: str | Path, write, binary: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A folder written whole or not at all: yields a temp folder beside ``path`` to fill, which then
    replaces ``path`` (a crash leaves the old folder, or none, and a hidden temp folder removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line, atomically (temp file + rename)."""

    def write(f):
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return atomic_write(path, write)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write a JSON document (indented), atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def write_text(text: str, path: str | Path) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda f: f.write(text))


def write_safetensors(tensors: dict[str, Any], path: str | Path,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as one safetensors file atomically (a crash leaves the old file or none)."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write(path, lambda f: f.write(data), binary=True)


def read_json(path: str | Path) -> Any:
    """A JSON document written by write_json."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file written by write_jsonl (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
