"""The loader reads hub-format JSONL (as the engine writes it) and names bad rows exactly."""

from __future__ import annotations

import json

import pytest

from cca_ray.data.gsm_symbolic import DataError, Problem, load_jsonl, write_problems
from cca_ray.data.template_parsing import load_templates
from cca_ray.data.templates import TemplateEngine


@pytest.fixture
def engine_rows(builtin_templates_dir):
    engine = TemplateEngine(seed=0)
    rows = []
    for template in load_templates(builtin_templates_dir)[:3]:
        rows += [i.row for i in engine.instantiate(template, 4).instances]
    return rows


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_loader_reads_rows_the_engine_writes(tmp_path, engine_rows):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(r) for r in engine_rows])
    problems = load_jsonl(path)
    assert [p.to_row() for p in problems] == engine_rows
    assert problems[0].gold == float(engine_rows[0]["answer"].rsplit("####", 1)[1])
    # round trip through the writer
    write_problems(problems, tmp_path / "q.jsonl")
    assert load_jsonl(tmp_path / "q.jsonl") == problems


def test_loader_reads_real_hub_style_rows(tmp_path):
    row = {"id": 0, "instance": 3, "question": "Q?", "answer": "Step.\n#### 1,200",
           "original_id": 17, "original_question": "orig", "original_answer": "#### 5",
           "canary": "canary GUID x"}
    (p,) = load_jsonl(write_lines(tmp_path / "hub.jsonl", [json.dumps(row)]))
    assert p == Problem(**row) and p.gold == 1200.0 and p.key == (0, 3)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("answer"), "field 'answer' is missing"),
        (lambda r: r.update(instance="3"), "field 'instance' must be an integer"),
        (lambda r: r.update(question=""), "field 'question' must be non-empty text"),
        (lambda r: r.update(answer="no final line"), "field 'answer': answer has no '#### N'"),
        (lambda r: r.update(original_id="x"), "field 'original_id' must be an integer or null"),
        (lambda r: r.update(id=None), "field 'id' must be a template id"),
    ],
)
def test_malformed_row_names_file_line_and_field(tmp_path, engine_rows, mutate, message):
    rows = [dict(r) for r in engine_rows[:3]]
    mutate(rows[1])
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert f"{path}:2:" in str(info.value) and message in str(info.value)


def test_invalid_json_duplicates_and_empty_lines_are_errors(tmp_path, engine_rows):
    good = json.dumps(engine_rows[0])
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_jsonl(write_lines(tmp_path / "bad.jsonl", [good, "{oops"]))
    with pytest.raises(DataError, match=r"dup.jsonl:2: .* repeats line 1"):
        load_jsonl(write_lines(tmp_path / "dup.jsonl", [good, good]))
    with pytest.raises(DataError, match=r"gap.jsonl:2: empty line"):
        load_jsonl(write_lines(tmp_path / "gap.jsonl", [good, "", good]))
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "missing.jsonl")
