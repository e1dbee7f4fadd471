"""GSM-Symbolic problems: load from the hub (apple/GSM-Symbolic) or a local JSONL file with the
same fields, validating every row. A malformed row stops the load with file, line and field."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cca_ray.data.answers import parse_gold
from cca_ray.errors import UserError

HUB_DATASET = "apple/GSM-Symbolic"
HUB_CONFIGS = ("main", "p1", "p2")
FIELDS = ("id", "instance", "question", "answer", "original_id", "original_question",
          "original_answer", "canary")


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, line and field at fault."""


@dataclass(frozen=True)
class Problem:
    """One GSM-Symbolic instance. ``id`` is the template id, ``gold`` the number after '####'."""

    id: int | str
    instance: int
    question: str
    answer: str
    original_id: int | None = None
    original_question: str = ""
    original_answer: str = ""
    canary: str = ""

    @property
    def template_id(self) -> int | str:
        return self.id

    @property
    def key(self) -> tuple[int | str, int]:
        return (self.id, self.instance)

    @property
    def gold(self) -> float:
        return parse_gold(self.answer)

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def _check_row(row: Any, where: str) -> Problem:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in FIELDS:
        if name not in row:
            raise DataError(f"{where}: field {name!r} is missing (every row needs {list(FIELDS)})")

    def bad(name: str, want: str) -> DataError:
        return DataError(f"{where}: field {name!r} must be {want}, got {row[name]!r:.60}")

    if not isinstance(row["id"], (int, str)) or isinstance(row["id"], bool) or row["id"] == "":
        raise bad("id", "a template id (integer or non-empty string)")
    if not isinstance(row["instance"], int) or isinstance(row["instance"], bool):
        raise bad("instance", "an integer")
    for name in ("question", "answer"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise bad(name, "non-empty text")
    if row["original_id"] is not None and (
        not isinstance(row["original_id"], int) or isinstance(row["original_id"], bool)
    ):
        raise bad("original_id", "an integer or null")
    for name in ("original_question", "original_answer", "canary"):
        if row[name] is not None and not isinstance(row[name], str):
            raise bad(name, "text or null")
    try:
        parse_gold(row["answer"])
    except ValueError as exc:
        raise DataError(f"{where}: field 'answer': {exc} (GSM8K style ends with '#### N')") from None
    text_fields = {k: row[k] or "" for k in ("original_question", "original_answer", "canary")}
    return Problem(id=row["id"], instance=row["instance"], question=row["question"],
                   answer=row["answer"], original_id=row["original_id"], **text_fields)


def validate_rows(rows: list[Any], source: str) -> list[Problem]:
    """Check every row; duplicates of (id, instance) are an error too."""
    problems: list[Problem] = []
    seen: dict[tuple, int] = {}
    for i, row in enumerate(rows, 1):
        p = _check_row(row, f"{source}:{i}")
        if p.key in seen:
            raise DataError(f"{source}:{i}: (id, instance) = {p.key} repeats line {seen[p.key]}")
        seen[p.key] = i
        problems.append(p)
    if not problems:
        raise DataError(f"{source}: no rows")
    return problems


def load_jsonl(path: str | Path) -> list[Problem]:
    """Problems from a local JSONL file in the hub's schema."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (make one with `cca-ray data instantiate`)")
    rows: list[Any] = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                raise DataError(f"{path}:{i}: empty line (one JSON object per line expected)")
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
    return validate_rows(rows, str(path))


def load_hub(name: str = "main", split: str = "test") -> list[Problem]:
    """Problems from the Hugging Face hub (needs network access to the hub)."""
    if name not in HUB_CONFIGS:
        raise DataError(f"GSM-Symbolic config {name!r} unknown; choose one of {HUB_CONFIGS}")
    import datasets  # heavy import, only on this path

    ds = datasets.load_dataset(HUB_DATASET, name=name, split=split)
    return validate_rows(list(ds), f"{HUB_DATASET}[{name}/{split}]")


def write_problems(problems: list[Problem], path: str | Path) -> Path:
    """Write problems as hub-schema JSONL (atomically)."""
    from cca_ray.io import write_jsonl

    return write_jsonl((p.to_row() for p in problems), path)
