"""GSM-Symbolic templates as data: a record's annotated question and worked solution parsed into
a Template, folders and JSONL files of records loaded, and folders of records written.

A template (``question_annotated``) is the question with ``{var,default}`` placeholders, then
``#init:`` assignments (``- $x = range(2, 10)``, ``- n = sample(names)``), ``#conditions:``
(boolean expressions) and ``#answer: <expression>``. ``answer_annotated`` is the worked solution
with ``{expression}`` placeholders, ending ``#### {answer}``. Instantiating templates is the
engine's job (``templates``).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cca_ray.errors import UserError

SECTION = re.compile(r"^[ \t]*#(init|conditions|answer)[ \t]*[:=]", re.MULTILINE)
QUESTION_SLOT = re.compile(r"\{([^{}]*)\}")
IDENT = re.compile(r"[A-Za-z_]\w*$")
DOLLAR_NAME = re.compile(r"\$(?=[A-Za-z_])")


class TemplateError(UserError, ValueError):
    """A template that cannot be parsed or instantiated; the message names template and line."""


@dataclass(frozen=True)
class Assignment:
    """One ``#init:`` line: the names it assigns and the expression they get."""

    targets: tuple[str, ...]
    expression: str
    draw: bool  # '$' prefix: a collection on the right means "draw one element"
    line: str


@dataclass
class Template:
    """A parsed template: question with slots, assignments, conditions, answer and solution."""

    template_id: int | str
    question: str  # the text part with {var,default} slots
    assignments: list[Assignment]
    conditions: list[str]
    answer_expression: str  # '#answer:' or, if absent, the '####' expression of the solution
    answer_annotated: str
    source: str = ""
    original_id: int | None = None
    original_question: str = ""
    original_answer: str = ""
    slot_names: list[str] = field(default_factory=list)
    held_out: bool = False  # the built-in world keeps such templates out of training
    # condition number (1-based) -> (drawn variable, expression it must equal)
    solvable: dict[int, tuple[str, str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"template {self.template_id}" + (f" ({self.source})" if self.source else "")


def parse_template(data: dict[str, Any], source: str = "") -> Template:
    """Parse one template record (the GSM-Symbolic JSON layout) into a Template."""
    where = source or str(data.get("id_shuffled", "?"))
    for key in ("question_annotated", "answer_annotated"):
        if not isinstance(data.get(key), str):
            raise TemplateError(f"{where}: missing or non-text field {key!r}")
    text = data["question_annotated"]
    matches = list(SECTION.finditer(text))
    if not matches or matches[0].group(1) != "init":
        raise TemplateError(f"{where}: question_annotated has no '#init:' section")
    sections: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        sections[m.group(1)] = text[m.end() : end]
    question = text[: matches[0].start()].strip()

    assignments = [_parse_assignment(line, where) for line in _bullets(sections["init"])]
    conditions = [DOLLAR_NAME.sub("", c) for c in _bullets(sections.get("conditions", ""))]
    answer_expr = DOLLAR_NAME.sub("", sections.get("answer", "").strip())
    if answer_expr.startswith("{") and answer_expr.endswith("}"):
        answer_expr = answer_expr[1:-1].strip()
    solution = data["answer_annotated"]
    if not answer_expr:
        if "####" not in solution:
            raise TemplateError(f"{where}: no '#answer:' section and no '####' in answer_annotated")
        answer_expr = solution.rsplit("####", 1)[1].strip().strip("{}").strip()

    slots = []
    for m in QUESTION_SLOT.finditer(question):
        name = m.group(1).split(",", 1)[0].strip()
        if not IDENT.match(name):
            raise TemplateError(f"{where}: question slot {{{m.group(1)}}} does not start with a name")
        slots.append(name)
    defined = {t for a in assignments for t in a.targets}
    missing = sorted(set(slots) - defined)
    if missing:
        raise TemplateError(f"{where}: question slots {missing} have no '#init:' assignment")

    template_id = data.get("id", data.get("id_shuffled", Path(source).stem if source else "?"))
    if isinstance(template_id, str) and template_id.isdigit():
        template_id = int(template_id)
    return Template(
        template_id=template_id,
        question=question,
        assignments=assignments,
        conditions=conditions,
        answer_expression=answer_expr,
        answer_annotated=solution,
        source=source,
        original_id=data.get("id_orig"),
        original_question=data.get("question", ""),
        original_answer=data.get("answer", ""),
        slot_names=slots,
        held_out=bool(data.get("held_out", False)),
        solvable=_solvable_equalities(assignments, conditions),
    )


def _solvable_equalities(
    assignments: list[Assignment], conditions: list[str]
) -> dict[int, tuple[str, str]]:
    """Conditions 'x == expr' (either side) where x is a single drawn variable no other
    assignment reads, and expr does not mention x."""
    drawn = {a.targets[0]: i for i, a in enumerate(assignments) if a.draw and len(a.targets) == 1}
    out: dict[int, tuple[str, str]] = {}
    for number, condition in enumerate(conditions, 1):
        try:
            node = ast.parse(condition.strip(), mode="eval").body
        except SyntaxError:
            continue  # reported when the condition is evaluated
        if not (isinstance(node, ast.Compare) and len(node.ops) == 1
                and isinstance(node.ops[0], ast.Eq)):
            continue
        for side, other in ((node.left, node.comparators[0]), (node.comparators[0], node.left)):
            if not isinstance(side, ast.Name) or side.id not in drawn:
                continue
            name = side.id
            later = assignments[drawn[name] + 1 :]
            other_names = {n.id for n in ast.walk(other) if isinstance(n, ast.Name)}
            if name in other_names or any(_mentions(a.expression, name) for a in later):
                continue
            if any(name == s for s, _ in out.values()):
                continue
            out[number] = (name, ast.unparse(other))
            break
    return out


def _mentions(expression: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", expression) is not None


def _bullets(section: str) -> list[str]:
    lines = []
    for raw in section.splitlines():
        line = raw.strip()
        if line.startswith("-"):
            lines.append(line[1:].strip())
        elif line and lines:  # a continuation of the previous bullet
            lines[-1] += " " + line
    return lines


def _parse_assignment(line: str, where: str) -> Assignment:
    if "=" not in line:
        raise TemplateError(f"{where}: '#init:' line is not an assignment: {line!r}")
    left, expression = line.split("=", 1)
    draw = left.strip().startswith("$")
    targets = tuple(t.strip().lstrip("$").strip() for t in left.split(","))
    for t in targets:
        if not IDENT.match(t) or t.startswith("__"):
            raise TemplateError(f"{where}: bad variable name {t!r} in {line!r}")
    return Assignment(targets, expression.strip(), draw, line)


def load_templates(path: str | Path) -> list[Template]:
    """Templates from a folder of *.json files (one template each) or a JSONL file of them."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise TemplateError(f"{path}: no *.json template files in this folder")
        return [parse_template(json.loads(f.read_text(encoding="utf-8")), str(f)) for f in files]
    if path.is_file():
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                out.append(parse_template(json.loads(line), f"{path}:{i}"))
        return out
    raise TemplateError(f"{path}: no such template folder or file")


def write_template_folder(records: Iterable[dict[str, Any]], out: Path) -> list[Path]:
    """One ``<id>.json`` file per template record in out, in order: the folder layout that
    load_templates reads (generators of committed template folders write through this)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for record in records:
        path = out / f"{record['id']}.json"
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
