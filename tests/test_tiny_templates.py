"""The tiny world's math templates: each yields 600 distinct, small-number, integer problems."""

from __future__ import annotations

import json
import re

import pytest

from cca_ray.data.answers import parse_gold
from cca_ray.data.template_parsing import load_templates
from cca_ray.data.templates import TemplateEngine

PER_TEMPLATE = 600
NUMBER = re.compile(r"\d+")


@pytest.fixture(scope="module")
def tiny_results(builtin_templates_dir):
    engine = TemplateEngine(seed=0)
    return [engine.instantiate(t, PER_TEMPLATE) for t in load_templates(builtin_templates_dir)]


@pytest.fixture(scope="module")
def tiny_json(builtin_templates_dir):
    return {f.stem: json.loads(f.read_text(encoding="utf-8"))
            for f in sorted(builtin_templates_dir.glob("*.json"))}


def test_every_template_gives_600_instances(tiny_results):
    for result in tiny_results:
        n = PER_TEMPLATE
        assert result.ok, result.error
        assert len(result.instances) == n
        assert len({i.row["question"] for i in result.instances}) == n


def test_numbers_are_small_and_answers_non_negative_integers(tiny_results):
    for result in tiny_results:
        for inst in result.instances:
            row = inst.row
            for text in (row["question"], row["answer"]):
                big = [n for n in NUMBER.findall(text) if int(n) >= 1000]
                assert not big, (result.template.name, text)
            gold = parse_gold(row["answer"])
            assert gold >= 0 and gold == int(gold), (result.template.name, row["answer"])


def test_solutions_have_one_to_four_calculator_steps(tiny_results):
    for result in tiny_results:
        steps = result.instances[0].row["answer"].count("<<")
        assert 1 <= steps <= 4, (result.template.name, steps)


def test_template_set_size_and_held_out(tiny_json):
    assert len(tiny_json) >= 30
    for stem, data in tiny_json.items():
        assert isinstance(data.get("held_out"), bool), stem
        assert data["id"] == stem
    assert sum(d["held_out"] for d in tiny_json.values()) >= 4


def test_construction_never_takes_over_so_the_trained_draws_stay(tiny_results):
    # The built-in model was trained on rejection's draws; every template accepts far more than
    # the engine's min_acceptance of its probe draws, so construction must never switch in.
    for result in tiny_results:
        assert result.sampler == "reject" and result.switched_at is None, result.template.name
