"""The real-model run's data: the everyday 'basic' templates (committed files = generator, every
template instantiates, answers are right), the template filter's lower bound, and the local
arithmetic-free general suites (well-formed, found by lm-eval without indexing its own tasks)."""

from __future__ import annotations

import json

import pytest

from cca_ray.config import ConfigError, parse_config
from cca_ray.data.basic_templates import BASIC_DIR, STORIES, template_folder, template_json
from cca_ray.data.safe_eval import SafeEvaluator
from cca_ray.data.template_filter import select_templates
from cca_ray.data.template_parsing import load_templates
from cca_ray.data.templates import instantiate_templates
from cca_ray.evaluate.facts import TASKS, fact_rows, write_fact_tasks
from cca_ray.evaluate.general import task_manager


def test_committed_basic_templates_equal_the_generator():
    files = sorted(BASIC_DIR.glob("*.json"))
    assert [f.stem for f in files] == sorted(s[0] for s in STORIES)
    for story in STORIES:
        assert json.loads((BASIC_DIR / f"{story[0]}.json").read_text()) == template_json(story), story[0]
    assert template_folder("basic") == BASIC_DIR


def test_every_basic_template_instantiates_with_small_right_answers():
    problems, failures = instantiate_templates(load_templates(BASIC_DIR), 36, seed=0, progress=False)
    assert failures == []
    assert len(problems) == 36 * len(STORIES)
    for p in problems:
        # the worked solution's calculator marks are true equations and end at the gold answer
        marks = [m.split("=") for m in p.answer.split("<<")[1:]]
        for lhs_rhs in marks:
            lhs, rhs = lhs_rhs[0], lhs_rhs[1].split(">>")[0]
            assert SafeEvaluator({}, {}).evaluate(lhs.replace("/", "//")) == int(rhs), p.answer
        assert float(marks[-1][1].split(">>")[0]) == p.gold
        assert 0 < p.gold <= 200 and p.gold == int(p.gold)


def test_template_filter_lower_bound():
    acc = {"a": 0.0, "b": 0.05, "c": 0.5, "d": 0.8, "e": 0.95}
    assert select_templates(acc, 0.8) == ["a", "b", "c"]
    assert select_templates(acc, 0.8, 0.05) == ["b", "c"]
    with pytest.raises(ConfigError, match="template_min_accuracy"):
        parse_config({"data": {"template_min_accuracy": 0.8, "template_threshold": 0.8}})


def test_fact_suites_are_well_formed_and_found_by_lm_eval(tmp_path):
    rows = fact_rows()
    assert set(rows) == set(TASKS)
    assert len(rows["facts_mmlu"]) >= 100 and len(rows["facts_trivia"]) == len(rows["facts_mmlu"])
    for r in rows["facts_mmlu"]:
        assert len(r["choices"]) == 4 == len(set(r["choices"]))
        assert not any(ch.isdigit() for ch in r["question"] + "".join(r["choices"]))  # arithmetic-free
    for r, t in zip(rows["facts_mmlu"], rows["facts_trivia"], strict=True):
        assert r["choices"][r["answer"]] == t["answer"]
    assert all(r["mc1_targets"]["labels"] == [1, 0] for r in rows["facts_truthful"])
    assert fact_rows() == rows  # seeded
    tasks = write_fact_tasks(tmp_path)
    manager = task_manager(list(TASKS), tasks)
    assert set(TASKS) <= set(manager.all_tasks)
    assert "mmlu" not in manager.all_tasks  # the folder alone: lm-eval's own ~15,000 not indexed
    mixed = task_manager([*TASKS, "mmlu"], tasks)  # a task outside the folder: both indexed
    assert set(TASKS) | {"mmlu"} <= set(mixed.all_tasks)
