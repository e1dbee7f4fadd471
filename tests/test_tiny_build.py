"""The built-in world: no leakage, exact tokenizer, a small build that loads and evaluates. That vLLM's
CPU build decodes the built model as HF does is test_sampling's (vLLM == the HF sampler, which
equals transformers' generate), one engine start for both checks."""

from __future__ import annotations

import json
import re

import pytest

from cca_ray.tiny.build import BuildSettings, math_text, world_data
from cca_ray.tiny.tokenizer import train_tokenizer
from cca_ray.tiny.world import make_world, training_texts


@pytest.fixture(scope="module")
def small_data(small_settings):
    return world_data(small_settings, progress=False)


def test_no_train_val_or_test_question_is_trained_on(small_data):
    """The problems CCA later trains, validates and tests on are never in the model's stories."""
    templates, held_out, splits, train = small_data
    protected = {p.question for p in splits.train + splits.val + splits.test}
    assert train and not protected & {p.question for p in train}
    assert held_out and not held_out & {p.id for p in train}
    assert len(held_out) >= 4 and len(templates) >= 30


def test_committed_templates_are_the_recipes_output(tmp_path, builtin_templates_dir):
    from cca_ray.tiny.recipes import write_templates

    for path in write_templates(tmp_path):
        assert path.read_text() == (builtin_templates_dir / path.name).read_text(), path.name


def test_tricky_decisions_recur_across_templates_and_in_held_out_ones(builtin_templates_dir):
    """Each tricky decision kind appears in several seen templates and in a held-out one, so a
    fix can transfer; every seen template mixes in clear steps or none at all."""
    seen, held = {}, {}
    for f in builtin_templates_dir.glob("*.json"):
        data = json.loads(f.read_text())
        for d in data["decisions"]:
            if d["competitor"]:
                (held if data["held_out"] else seen).setdefault(d["kind"], set()).add(f.stem)
    assert set(seen) == {"given", "sells", "packs"}
    assert all(len(ids) >= 5 for ids in seen.values()), seen
    assert all(kind in held for kind in seen), held


def test_training_stories_hold_the_competitor_in_a_biased_minority():
    """Competitor operations are a minority of tricky decisions overall but the majority for the
    biased items, and every other decision is always right."""
    from cca_ray.tiny.build import world_data, world_summary

    settings = BuildSettings(train_pool_per_template=150)
    _, _, _, train = world_data(settings, progress=False)
    summary = world_summary(train)
    assert 0.2 < summary["competitor_share_in_training"] < 0.5
    assert summary["competitor_share_biased_items"] > 0.75
    assert summary["competitor_share_other_items"] < 0.15
    for p in train:  # a story's solution is consistent with its own operations
        from cca_ray.data.answers import parse_gold
        from cca_ray.tiny.build import OPERATIONS, STEP_LINE

        steps = STEP_LINE.findall(math_text(p))
        assert steps and all(OPERATIONS[op](int(a), int(b)) == int(c) for a, op, b, c in steps)
        assert int(steps[-1][3]) == parse_gold(p.answer)


def test_step_report_counts_arithmetic_slips_and_competitor_decisions(small_data):
    from cca_ray.tiny.build import step_report

    _, _, splits, _ = small_data
    problem = next(p for p in splits.test if p.id == "w11")  # given (+), then sells (-)
    a, v1, v2 = (int(x) for x in re.findall(r"\d+", problem.question)[:3])
    right = (f"X is given {v1}, so X has {a} + {v1} = {a + v1} y. "
             f"X sells {v2}, so X has {a + v1} - {v2} = {a + v1 - v2}.")
    wrong = f"X is given {v1}, so X has {a} - {v1} = {a - v1 + 1} y. X sells {v2}, so X has 5 - {v2} = 99."
    report = step_report([problem, problem], [right, wrong])
    assert report["steps_written"] == 4
    assert report["arithmetic_step_accuracy"] == 2 / 4
    given = report["decisions_by_kind"]["given"]
    assert given == {"right": 1, "competitor": 1, "other": 0, "right_share": 0.5}
    assert report["decisions_by_kind"]["sells"]["right"] == 2


def test_full_settings_give_at_least_2000_test_problems():
    s = BuildSettings()
    assert s.instances_per_template * 0.40 * 32 >= 2000


def test_tokenizer_round_trips_the_corpus_exactly(small_data):
    _, _, splits, train = small_data
    texts = [math_text(p) for p in train[:200]] + training_texts(make_world(0, 8), 0)[:100]
    tok = train_tokenizer(texts)
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    digits = tok("A: 1234 apples", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in digits if tok.decode([i]).strip().isdigit()] == list("1234")


def test_small_build_writes_a_loadable_hf_folder_with_its_report(small_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = json.loads((small_model / "build_report.json").read_text())
    for key in ("test_accuracy_seen_templates", "test_accuracy_held_out_templates",
                "templates_below_threshold", "train_seconds", "general", "test_steps", "world"):
        assert key in report
    steps = report["test_steps"]
    if steps["steps_written"]:  # a 40-step model may write no step at all
        assert 0.0 <= steps["arithmetic_step_accuracy"] <= 1.0
    else:
        assert steps["arithmetic_step_accuracy"] is None
    assert set(steps["decisions_by_kind"]) >= {"given", "sells", "packs"}
    assert report["world"]["competitor_share_biased_items"] > report["world"]["competitor_share_other_items"]
    assert 0.0 <= report["test_accuracy_seen_templates"] <= 1.0
    assert set(report["general"]) == {"tinyworld_mmlu", "tinyworld_trivia", "tinyworld_truthful"}
    for g in report["general"].values():
        assert 0.0 <= g["score"] <= 1.0 and g["stderr"] >= 0.0
    model = AutoModelForCausalLM.from_pretrained(small_model)
    tok = AutoTokenizer.from_pretrained(small_model)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.head_dim >= 32
    text = "Q: How many apples?\nA: Let's think step by step. The final answer is 120."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    for name in ("tinyworld_mmlu", "tinyworld_trivia", "tinyworld_truthful"):
        assert (small_model / "tasks" / f"{name}.yaml").is_file()
        assert str(small_model.resolve()) in (small_model / "tasks" / f"{name}.yaml").read_text()
