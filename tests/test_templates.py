"""The template engine over the 100 real GSM-Symbolic templates and the project's own."""

from __future__ import annotations

import json
import random

import pytest

from cca_ray.data.answers import parse_gold
from cca_ray.data.pools import POOLS
from cca_ray.data.safe_eval import SafeEvaluator
from cca_ray.data.template_functions import UnsafeExpressionError, make_functions, unwrap
from cca_ray.data.template_parsing import QUESTION_SLOT, TemplateError, load_templates, parse_template
from cca_ray.data.templates import TemplateEngine

PER_TEMPLATE = 50


def instantiate_all(folder):
    engine = TemplateEngine(seed=0)
    return [engine.instantiate(t, PER_TEMPLATE) for t in load_templates(folder)]


@pytest.fixture(scope="module")
def shared_results(shared_templates_dir):
    return instantiate_all(shared_templates_dir)


@pytest.fixture(scope="module")
def builtin_results(builtin_templates_dir):
    return instantiate_all(builtin_templates_dir)


def check_instances(result):
    """Every instance: final '####' number == #answer on the same variables, every condition
    holds, no placeholder left, questions distinct, rows in the hub schema."""
    template = result.template
    questions = set()
    for inst in result.instances:
        evaluator = SafeEvaluator({**POOLS, **inst.variables}, make_functions(random.Random(0)))
        expected = float(unwrap(evaluator.evaluate(template.answer_expression)))
        assert parse_gold(inst.row["answer"]) == pytest.approx(expected, rel=1e-9, abs=1e-9)
        for condition in template.conditions:
            assert evaluator.evaluate(condition), (template.name, condition, inst.variables)
        assert not QUESTION_SLOT.search(inst.row["question"]), inst.row["question"]
        assert set(inst.row) == {"id", "instance", "question", "answer", "original_id",
                                 "original_question", "original_answer", "canary"}
        questions.add(inst.row["question"])
    assert len(questions) == len(result.instances)


def test_shared_templates_instantiate(shared_results):
    # 99: every template but 62, whose #answer disagrees with its worked solution
    ok = [r for r in shared_results if r.ok]
    assert len(shared_results) == 100
    assert len(ok) >= 99, [r.error for r in shared_results if not r.ok]
    for result in ok:
        assert len(result.instances) == PER_TEMPLATE
        check_instances(result)


def test_shared_template_failures_say_why(shared_results):
    for result in shared_results:
        if not result.ok:
            assert result.template.name in result.error
            assert "#answer" in result.error or "tries" in result.error


def test_inconsistent_template_is_refused_with_its_reason(shared_templates_dir):
    # Template 62's '#answer' drops one n1 term relative to its own worked solution.
    data = json.loads((shared_templates_dir / "0062.json").read_text())
    result = TemplateEngine(seed=0).instantiate(parse_template(data, "0062"), 5)
    assert not result.ok and "disagree" in result.error


def test_builtin_templates_instantiate(builtin_results):
    assert len(builtin_results) >= 8
    for result in builtin_results:
        assert result.ok, result.error
        check_instances(result)


def test_instantiation_is_deterministic_per_seed(builtin_templates_dir):
    template = load_templates(builtin_templates_dir)[0]
    rows = [[i.row for i in TemplateEngine(seed=s).instantiate(template, 5).instances]
            for s in (1, 1, 2)]
    assert rows[0] == rows[1]
    assert rows[0] != rows[2]


TEMPLATE = {
    "id": "t",
    "question_annotated": "{name,Ann} has {a,2} cats.\n\n#init:\n- name = sample(names)\n"
                          "- $a = range(1, 5)\n\n#conditions:\n- {condition}\n\n#answer: a * 2",
    "answer_annotated": "She has {a} cats, so {a*2} eyes.\n#### {a*2}",
}


def make(condition: str = "a > 0", **overrides):
    data = {**TEMPLATE, **overrides}
    data["question_annotated"] = data["question_annotated"].replace("{condition}", condition)
    return parse_template(data, "inline")


def test_unsatisfiable_conditions_stop_with_a_clear_error():
    engine = TemplateEngine(seed=0, max_tries_per_instance=50, min_tries=500)
    result = engine.instantiate(make("a > 100"), 3)
    assert not result.ok
    assert result.tries == 500
    assert "only 0 of 3 instances after 500 tries" in result.error
    assert "condition 1 is false: a > 100" in result.error


def test_too_few_distinct_values_is_reported():
    result = TemplateEngine(seed=0, min_tries=300).instantiate(
        make(question_annotated="{a,2} cats.\n#init:\n- $a = range(1, 3)\n#answer: a*2"), 5)
    assert not result.ok and "only 2 of 5" in result.error and "duplicate question" in result.error


def test_hostile_template_is_refused():
    result = TemplateEngine(seed=0).instantiate(make("__import__('os').system('true')"), 1)
    assert not result.ok and "dunder" in result.error and "inline" in result.error


def test_equality_conditions_are_solved_exactly():
    # 'b == a + 7' with b drawn from 1..1000: rejection sampling would need ~1000 tries each.
    data = {
        "question_annotated": "{a,1} and {b,8}.\n#init:\n- $a = range(1, 20)\n"
                              "- $b = range(1, 1000)\n#conditions:\n- b == a + 7\n#answer: b",
        "answer_annotated": "#### {b}",
    }
    result = TemplateEngine(seed=0).instantiate(parse_template(data, "eq"), 10)
    assert result.ok and result.tries < 40
    assert all(i.variables["b"] == i.variables["a"] + 7 for i in result.instances)


@pytest.mark.parametrize(
    "question_annotated, message",
    [
        ("No sections at all.", "no '#init:' section"),
        ("{x,1}\n#init:\n- $y = range(1, 3)\n#answer: y", "no '#init:' assignment"),
        ("{x,1}\n#init:\n- x range(1, 3)\n#answer: x", "not an assignment"),
        ("{x,1}\n#init:\n- __x = range(1, 3)\n#answer: x", "bad variable name"),
    ],
)
def test_malformed_templates_fail_at_parse(question_annotated, message):
    with pytest.raises(TemplateError, match=message):
        parse_template({"question_annotated": question_annotated, "answer_annotated": "#### 1"},
                       "bad.json")


def test_unsafe_expression_error_names_template_and_line():
    engine = TemplateEngine(seed=0)
    template = make(question_annotated="{a,1}\n#init:\n- $a = open('/etc/passwd')\n#answer: a")
    result = engine.instantiate(template, 1)
    assert not result.ok
    assert "inline" in result.error and "#init: $a = open('/etc/passwd')" in result.error
    with pytest.raises(UnsafeExpressionError):
        engine.draw(template, random.Random(0))
