"""Sampling template variables by construction (cca_ray/data/construction_plan.py, built by
template_analysis.py): tight conditions filled where rejection runs out of tries, exact
enumeration equal to brute force, uniform exact draws, determinism, clear errors, and the
built-in world's draws unchanged."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from fractions import Fraction

import pytest

from cca_ray.data.answers import parse_gold
from cca_ray.data.construction_plan import multiples
from cca_ray.data.example_templates import TIGHT_DIVISIBILITY
from cca_ray.data.pools import POOLS
from cca_ray.data.safe_eval import SafeEvaluator
from cca_ray.data.template_analysis import build_plan
from cca_ray.data.template_functions import make_functions, unwrap
from cca_ray.data.template_parsing import load_templates, parse_template
from cca_ray.data.templates import TemplateEngine

# t must be a multiple of both coefficients' denominators; the id seeds the engine's draws
TIGHT = {**TIGHT_DIVISIBILITY, "id": "tight"}
BUDGET = {"max_tries_per_instance": 40, "min_tries": 0}  # 2,000 tries for 50 instances


def template(init: str, conditions: list[str], answer: str = "1", slots: str = "") -> object:
    lines = "\n".join(f"- {c}" for c in conditions)
    return parse_template({
        "id": "inline",
        "question_annotated": f"Q {slots}\n#init:\n{init}\n#conditions:\n{lines}\n#answer: {answer}",
        "answer_annotated": f"#### {{{answer}}}",
    }, "inline")


def assert_valid(result) -> None:
    """Every instance meets every condition, its '####' equals #answer, questions differ."""
    t = result.template
    for inst in result.instances:
        evaluator = SafeEvaluator({**POOLS, **inst.variables}, make_functions(random.Random(0)))
        for condition in t.conditions:
            assert evaluator.evaluate(condition), (condition, inst.variables)
        expected = float(unwrap(evaluator.evaluate(t.answer_expression)))
        assert parse_gold(inst.row["answer"]) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert len({i.row["question"] for i in result.instances}) == len(result.instances)


def test_tight_divisibility_chain_fills_by_construction_where_rejection_runs_out():
    tight = parse_template(TIGHT, "tight")
    rejected = TemplateEngine(seed=0, strategy="reject", **BUDGET).instantiate(tight, 50)
    assert not rejected.ok and len(rejected.instances) < 50 and rejected.tries == 2_000
    assert "only" in rejected.error and "after 2000 tries" in rejected.error
    built = TemplateEngine(seed=0, **BUDGET).instantiate(tight, 50)
    assert built.ok, built.error
    assert len(built.instances) == 50 and built.sampler == "construct"
    assert built.switched_at == 500 and built.tries < 700  # the probe, then ~1 try per instance
    assert built.seconds > 0 and built.instances_per_second > 0
    assert_valid(built)
    for inst in built.instances:
        t, f1, f2 = (inst.variables[k] for k in ("t", "frac1", "frac2"))
        assert t % f1.denominator == 0 and t % f2.denominator == 0


def test_construction_from_the_first_try_fills_too():
    result = TemplateEngine(seed=0, probe_tries=0, **BUDGET).instantiate(
        parse_template(TIGHT, "tight"), 50)
    assert result.ok and result.switched_at == 0 and result.tries < 60
    assert_valid(result)


def test_same_seed_same_instances_other_seed_other_instances():
    tight = parse_template(TIGHT, "tight")

    def rows(engine):
        return [i.row for i in engine.instantiate(tight, 30).instances]

    warm = TemplateEngine(seed=4, probe_tries=0)
    first = rows(warm)
    assert rows(warm) == first  # a warm plan (memos, cached enumeration) changes nothing
    assert rows(TemplateEngine(seed=4, probe_tries=0)) == first
    assert rows(TemplateEngine(seed=5, probe_tries=0)) != first
    default = TemplateEngine(seed=4)
    assert rows(default) == rows(TemplateEngine(seed=4)) != rows(TemplateEngine(seed=5))


@pytest.mark.parametrize("init, conditions", [
    ("- $t = range(1, 300)\n- $f = fraction_alnum\n- $g = [Fraction(2, 3), Fraction(3, 8)]",
     ["is_int(f * t)", "is_int(t * g / 2)", "t > 20"]),
    ("- $n = range(10, 400, 3)\n- $p = range(5, 60)", ["is_int(n * p / 100)", "p < n"]),
    ("- $x = range(1, 200)\n- $m = range(2, 9)\n- $k = range(1, 6)\n- s = m + k",
     ["divides(x, s)", "x % k == 0", "x > s * 3"]),
    ("- $a = range(1, 20)\n- $b = range(1, 30)\n- $c = range(1, 60)",
     ["c == a + b", "is_int(c / 7)", "a < b"]),
    ("- $w = np.arange(0.5, 8, 0.25)\n- $n = range(1, 50)", ["is_int(n / w)", "n * w < 100"]),
    ("- $m = multi_times\n- $x = range(1, 90)\n- y = x * m", ["is_int(y / 12)", "y < 150"]),
])
def test_exact_enumeration_equals_brute_force(init, conditions):
    t = template(init, conditions)
    plan = build_plan(t, POOLS)
    assert len(plan.components) == 1 and plan.components[0].exact, plan.describe()
    got = plan.solutions(0)
    steps = plan.components[0].steps
    functions = make_functions(random.Random(0))
    want = []
    for values in itertools.product(*(s.domain for s in steps)):
        env = {**POOLS, **{s.var: v for s, v in zip(steps, values, strict=True)}}
        evaluator = SafeEvaluator(env, functions)
        for a in t.assignments:
            if not a.draw:
                env[a.targets[0]] = evaluator.evaluate(a.expression)
        if all(evaluator.evaluate(c) for c in conditions):
            want.append(tuple(values))
    assert want, "the case should be satisfiable"
    assert sorted(map(repr, (tuple(s[v.var] for v in steps) for s in got))) == \
        sorted(map(repr, want))


def test_exact_draws_are_uniform_over_the_satisfying_tuples():
    plan = build_plan(template("- $x = range(1, 60)\n- $d = range(2, 12)",
                               ["divides(x, d)", "x > 30"]), POOLS)
    total = len(plan.solutions(0))
    rng = random.Random(0)
    counts = Counter(tuple(sorted(plan.sample(rng)[0].items())) for _ in range(400 * total))
    assert len(counts) == total  # every satisfying tuple comes out ...
    assert all(300 < c < 500 for c in counts.values()), counts.most_common(3)  # ... equally


def test_sequential_draws_are_corrected_to_uniform():
    # d first, then x among d's multiples: d = 2 has 14 completions, d = 11 three. Proposals
    # favour the rare ones; the engine's correction (accept w / max w) evens them out.
    t = template("- $x = range(1, 60)\n- $d = range(2, 12)", ["divides(x, d)", "x > 30"])
    tuples = {tuple(sorted(s.items())) for s in build_plan(t, POOLS).solutions(0)}
    plan = build_plan(t, POOLS, exact_work=0)
    assert not plan.components[0].exact

    def counts(bounds):
        rng, out = random.Random(0), Counter()
        while sum(out.values()) < 200 * len(tuples):
            values, _ = plan.sample(rng, bounds)
            if values is not None:
                out[tuple(sorted(values.items()))] += 1
        return out

    corrected, tilted = counts({}), counts(None)
    assert set(corrected) == set(tilted) == tuples
    assert all(140 < c < 260 for c in corrected.values()), corrected.most_common(3)
    assert max(tilted.values()) > 400  # the uncorrected proposal is far from uniform


def test_multiples_in_a_range_match_brute_force():
    rng = random.Random(1)
    for _ in range(3_000):
        start, step = rng.randint(-60, 60), rng.choice([1, 2, 3, 5, 10, -1, -4])
        domain = range(start, start + step * rng.randint(0, 80), step)
        q = rng.randint(1, 50)
        assert list(multiples(domain, q)) == [i for i, v in enumerate(domain) if v % q == 0]


def test_unsatisfiable_conditions_are_proven_by_enumeration():
    t = template("- $a = range(1, 50)\n- $b = range(1, 50)", ["a + b > 200"])
    result = TemplateEngine(seed=0, probe_tries=0).instantiate(t, 3)
    assert not result.ok and result.tries == 0
    assert "cannot all hold" in result.error and "every combination checked" in result.error
    assert "a, b" in result.error and "conditions 1" in result.error


def test_conditions_on_opaque_draws_are_left_to_rejection():
    # k comes from sample(.., 2): not constructible; the divisibility on x still is.
    t = template("- a, b = sample([2, 3, 4, 5], 2)\n- $x = range(1, 3000)\n- $d = range(30, 60)",
                 ["divides(x, d)", "a < b"], slots="{a,1} {b,2} {x,3} {d,4}")
    plan = build_plan(t, POOLS)
    assert plan.describe().startswith("d -> x (exact")
    result = TemplateEngine(seed=0, probe_tries=0).instantiate(t, 20)
    assert result.ok, result.error
    assert_valid(result)


def test_disagreement_error_shows_one_concrete_draw_with_both_numbers():
    data = {
        "id": "wrong",
        "question_annotated": "{name,Ann} buys {a,3} packs.\n#init:\n- name = sample(names)\n"
                              "- $a = range(2, 9)\n#answer: a * 2",
        "answer_annotated": "Each pack holds 3, so {a} * 3 = {a*3}.\n#### {a*3}",
    }
    result = TemplateEngine(seed=0).instantiate(parse_template(data, "wrong"), 5)
    assert not result.ok and "disagree" in result.error
    m = re.search(r"with name=\w+, a=(\d+): '#answer: a \* 2' gives (\d+), but the worked "
                  r"solution's '#### \{a\*3\}' gives (\d+)", result.error)
    assert m, result.error
    a, answer, solution = map(int, m.groups())
    assert (answer, solution) == (2 * a, 3 * a)
    assert result.tries < 2_000  # refused after 1,000 disagreeing draws, not after 20,000


def test_shared_template_62_disagreement_names_its_numbers(shared_templates_dir):
    t = load_templates(shared_templates_dir)[62]
    result = TemplateEngine(seed=0).instantiate(t, 5)
    m = re.search(r"n1=(\d+), p=(\d+): '#answer: [^']+' gives ([\d.]+), but the worked "
                  r"solution's '#### [^']+' gives ([\d.]+)", result.error)
    assert m, result.error
    n1, p, answer, solution = int(m[1]), int(m[2]), float(m[3]), float(m[4])
    share = Fraction(p, 100) * n1
    assert answer == pytest.approx(float(2 * (n1 + share)))
    assert solution == 2 * (n1 + n1 + int(share))


def test_builtin_templates_keep_their_rejection_draws(builtin_templates_dir):
    # The built-in model was trained on these draws: construction must never take over there.
    # 600 instances take over 500 tries, so each template meets the switch decision (seed 0 is
    # checked the same way in test_tiny_templates; seed 10,000 is the build's training pool).
    for t in load_templates(builtin_templates_dir):
        built = TemplateEngine(seed=10_000).instantiate(t, 600)
        rejected = TemplateEngine(seed=10_000, strategy="reject").instantiate(t, 600)
        assert built.sampler == "reject" and built.switched_at is None, t.name
        assert built.tries >= 600
        assert [i.row for i in built.instances] == [i.row for i in rejected.instances]


def test_huge_domains_are_drawn_not_scanned():
    # 'x > 3 * y' on 90,000 values: no exact enumeration, no scan per draw; still valid output.
    t = template("- $x = range(1, 90000)\n- $y = range(1, 40000)", ["x > 3 * y"],
                 slots="{x,5} {y,1}")
    plan = build_plan(t, POOLS)
    assert plan.describe().endswith("(sequential)")
    result = TemplateEngine(seed=0, probe_tries=0).instantiate(t, 20)
    assert result.ok and result.seconds < 5, result.error
    assert_valid(result)
