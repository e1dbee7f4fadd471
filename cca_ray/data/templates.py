"""GSM-Symbolic template engine: draw a parsed template's variables, check its conditions and
render question and answer into rows of the hub's JSONL schema. All expressions go through the
whitelisted evaluator in ``safe_eval``; parsing and loading templates is ``template_parsing``.

Variables are drawn by rejection (draw all, check the conditions, retry); a template whose
conditions reject nearly every draw is handed to sampling by construction
(``construction_plan``), see ``TemplateEngine``.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from cca_ray.data.answers import parse_gold
from cca_ray.data.construction_plan import ConstructionPlan
from cca_ray.data.pools import POOLS
from cca_ray.data.safe_eval import SafeEvaluator
from cca_ray.data.template_analysis import build_plan
from cca_ray.data.template_functions import Labeled, UnsafeExpressionError, labeled, make_functions, unwrap
from cca_ray.data.template_parsing import QUESTION_SLOT, Template, TemplateError
from cca_ray.data.template_parsing import load_templates as load_templates  # for the engine's callers

if TYPE_CHECKING:
    from cca_ray.data.gsm_symbolic import Problem

CANARY = "cca-ray generated GSM-Symbolic-style data; canary GUID 6b1f3c2e-cca0-4d1e-9a57-ray0data0001"


def format_value(value: Any) -> str:
    """How a value reads in text: 12 not 12.0, 0.3 not 0.30000000000000004, 'half' for Labeled."""
    if isinstance(value, Labeled):
        return value.text
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Fraction):
        if value.denominator == 1:
            return str(value.numerator)
        d = value.denominator
        while d % 2 == 0:
            d //= 2
        while d % 5 == 0:
            d //= 5
        return format_value(float(value)) if d == 1 else f"{value.numerator}/{value.denominator}"
    if isinstance(value, float):
        if value == round(value) and abs(value) < 1e15:
            return str(int(round(value)))
        return f"{value:.6f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


@dataclass
class Instance:
    """One instantiated problem: the JSONL row and the variables that made it."""

    row: dict[str, Any]
    variables: dict[str, Any]
    answer_value: Any


@dataclass
class InstantiationResult:
    """What instantiating one template gave: instances, the tries and wall time it took."""

    template: Template
    instances: list[Instance]
    tries: int
    rejections: Counter  # reason -> count
    error: str | None = None
    seconds: float = 0.0  # wall time of instantiate()
    sampler: str = "reject"  # "reject", or "construct" once construction took over
    switched_at: int | None = None  # the try after which construction took over

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def instances_per_second(self) -> float:
        """Throughput of this template's instantiation (instances / wall second)."""
        return len(self.instances) / self.seconds if self.seconds > 0 else float("inf")


STRATEGIES = ("construct", "reject")
INCONSISTENT_LIMIT = 1_000  # draws that met the conditions, all with '####' != #answer: stop


class TemplateEngine:
    """Draws instances of templates with a seeded RNG per template.

    strategy "reject" draws every variable and retries until the conditions hold (the
    original sampler, kept as the fallback and the benchmark's baseline). strategy "construct"
    (default) starts exactly like "reject" and, when after probe_tries tries fewer than
    min_acceptance of the draws met the conditions, continues with the template's
    ConstructionPlan (cca_ray/data/construction_plan.py: conditions solved by enumeration and
    divisor multiples instead of retries). Templates that rejection fills easily, such as the
    built-in world's, therefore keep their draws unchanged, draw for draw; probe_tries=0
    constructs from the first try. Either way the same seed gives the same instances.
    """

    def __init__(self, seed: int = 0, max_tries_per_instance: int = 2_000,
                 min_tries: int = 20_000, pools: dict[str, list] | None = None,
                 solve_equalities: bool = True, strategy: str = "construct",
                 probe_tries: int = 500, min_acceptance: float = 0.02):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.seed = seed
        self.solve_equalities = solve_equalities
        self.max_tries_per_instance = max_tries_per_instance
        self.min_tries = min_tries
        self.pools = POOLS if pools is None else pools
        self.strategy = strategy
        self.probe_tries = probe_tries
        self.min_acceptance = min_acceptance
        self._plans: dict[int, tuple[Template, ConstructionPlan]] = {}

    def plan(self, template: Template) -> ConstructionPlan:
        """The template's ConstructionPlan, built once per engine and template."""
        cached = self._plans.get(id(template))
        if cached is None or cached[0] is not template:
            cached = (template, build_plan(template, self.pools))
            self._plans[id(template)] = cached
        return cached[1]

    def draw(self, template: Template, rng: random.Random,
             fixed: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, str]:
        """One attempt: variables satisfying every condition, or (None, reason for rejection).

        A condition ``x == expr`` whose side ``x`` is a drawn variable that no later line reads
        is solved instead of hoped for: x takes expr's value when that value is in x's domain,
        else the attempt is rejected. For a uniform domain this is exactly the distribution of
        rejection sampling, without the thousands of wasted draws of tight equalities.
        ``fixed`` holds values already drawn by construction: those lines are not evaluated.
        """
        evaluator = SafeEvaluator({**self.pools}, make_functions(rng))
        variables = evaluator.variables
        domains: dict[str, list | range] = {}
        for a in template.assignments:
            if fixed and len(a.targets) == 1 and a.targets[0] in fixed:
                variables[a.targets[0]] = fixed[a.targets[0]]
                continue
            value = self._evaluate(evaluator, a.expression, template, f"#init: {a.line}")
            if a.draw and isinstance(value, (list, range)):
                if len(value) == 0:
                    raise TemplateError(f"{template.name}: '{a.line}' draws from an empty range")
                if len(a.targets) == 1:
                    domains[a.targets[0]] = value
                value = rng.choice(value)
            if len(a.targets) > 1:
                if not isinstance(value, (list, tuple)) or len(value) != len(a.targets):
                    raise TemplateError(
                        f"{template.name}: '{a.line}' gives {value!r}, "
                        f"which does not unpack into {len(a.targets)} names"
                    )
                values = [labeled(v) for v in value]
            else:
                values = [labeled(value)]
            variables.update(zip(a.targets, values, strict=True))
        for i, (name, expression) in template.solvable.items():
            if name not in domains or not self.solve_equalities:
                continue
            try:
                target = unwrap(self._evaluate(evaluator, expression, template, "#conditions"))
            except ZeroDivisionError:
                return None, f"condition {i} divides by zero: {template.conditions[i - 1]}"
            match = [v for v in domains[name] if unwrap(v) == target][:1]
            if not match:
                return None, f"condition {i} is false: {template.conditions[i - 1]}"
            variables[name] = labeled(match[0])
        for i, condition in enumerate(template.conditions, 1):
            try:
                holds = self._evaluate(evaluator, condition, template, f"#conditions: {condition}")
            except ZeroDivisionError:
                return None, f"condition {i} divides by zero: {condition}"
            if not holds:
                return None, f"condition {i} is false: {condition}"
        assigned = {t for a in template.assignments for t in a.targets}
        return {k: v for k, v in variables.items() if k in assigned}, ""

    def render(self, template: Template, variables: dict[str, Any], instance: int) -> Instance:
        """The JSONL row for variables that satisfy the conditions."""
        evaluator = SafeEvaluator({**self.pools, **variables}, make_functions(random.Random(0)))

        def slot(m: re.Match) -> str:
            return format_value(variables[m.group(1).split(",", 1)[0].strip()])

        question = QUESTION_SLOT.sub(slot, template.question)

        def expr(m: re.Match) -> str:
            value = self._evaluate(evaluator, m.group(1), template, "answer_annotated")
            if isinstance(value, Labeled) and _in_arithmetic(template.answer_annotated, m):
                value = value.value  # '5 / {sides} =' wants 6, 'a {sides} die' wants 'six-sided'
            return format_value(value)

        answer = QUESTION_SLOT.sub(expr, template.answer_annotated).strip()
        value = unwrap(self._evaluate(evaluator, template.answer_expression, template, "#answer"))
        if "####" not in answer:
            answer += f"\n#### {format_value(value)}"
        row = {
            "id": template.template_id,
            "instance": instance,
            "question": question,
            "answer": answer,
            "original_id": template.original_id,
            "original_question": template.original_question,
            "original_answer": template.original_answer,
            "canary": CANARY,
        }
        return Instance(row=row, variables=variables, answer_value=value)

    def instantiate(self, template: Template, n: int) -> InstantiationResult:
        """n distinct instances of one template, or an error saying why it could not.

        The result carries the tries, the wall time and which sampler finished the job (see the
        class docstring for when construction takes over from rejection).
        """
        start = time.perf_counter()
        rng = random.Random(f"{self.seed}/{template.template_id}")
        instances: list[Instance] = []
        seen: set[str] = set()
        rejections: Counter = Counter()
        budget = max(self.min_tries, self.max_tries_per_instance * n)
        tries = met = 0  # met: draws that met every condition
        plan: ConstructionPlan | None = None
        bounds: dict[int, tuple[int, int]] = {}  # the plan's uniformity correction, this call's
        switched_at: int | None = None
        example = ""  # one draw whose '####' number differs from #answer, with both numbers
        error: str | None = None
        try:
            while len(instances) < n and tries < budget:
                if (self.strategy == "construct" and tries == self.probe_tries
                        and (tries == 0 or met < self.min_acceptance * tries)):
                    candidate = self.plan(template)
                    if candidate.unsatisfiable and not met:
                        error = (f"{template.name}: only 0 of {n} instances after {tries} tries: "
                                 f"the conditions cannot all hold: {candidate.unsatisfiable}")
                        break
                    if candidate.constructive and not candidate.unsatisfiable:
                        plan, switched_at = candidate, tries
                tries += 1
                if plan is not None:
                    fixed, reason = plan.sample(rng, bounds)
                    variables, reason = (None, reason) if fixed is None else \
                        self.draw(template, rng, fixed)
                else:
                    variables, reason = self.draw(template, rng)
                if variables is None:
                    rejections[reason] += 1
                    continue
                met += 1
                try:
                    inst = self.render(template, variables, len(instances))
                except ZeroDivisionError:
                    rejections["solution divides by zero"] += 1
                    continue
                problem = _consistency_problem(inst)
                if problem:
                    rejections[problem] += 1
                    if problem == _INCONSISTENT:
                        example = example or _disagreement(template, inst)
                        if not instances and rejections[problem] >= INCONSISTENT_LIMIT:
                            break  # the template is wrong, not unlucky: say so now
                    continue
                if inst.row["question"] in seen:
                    rejections["duplicate question"] += 1
                    continue
                seen.add(inst.row["question"])
                instances.append(inst)
        except (TemplateError, UnsafeExpressionError) as exc:
            error = str(exc)
        if error is None and len(instances) < n:
            inconsistent = rejections[_INCONSISTENT]
            others = sum(c for r, c in rejections.items()
                         if not r.startswith(("condition", "construction")))
            if inconsistent and inconsistent == others and not instances:
                error = (
                    f"{template.name}: every draw that met the conditions ({inconsistent}) gave a "
                    f"'####' number different from '#answer: {template.answer_expression}'; the "
                    f"template's #answer and its worked solution disagree, fix one of them. "
                    f"{example}"
                )
            else:
                top = "; ".join(f"{r} ({c}x)" for r, c in rejections.most_common(3))
                error = (
                    f"{template.name}: only {len(instances)} of {n} instances after {tries} tries "
                    f"(conditions unsatisfiable or too few distinct values). Most frequent "
                    f"rejections: {top or 'none'}" + (f". {example}" if example else "")
                )
        return InstantiationResult(template, instances, tries, rejections, error,
                                   seconds=time.perf_counter() - start,
                                   sampler="construct" if plan is not None else "reject",
                                   switched_at=switched_at)

    @staticmethod
    def _evaluate(evaluator: SafeEvaluator, source: str, template: Template, where: str) -> Any:
        try:
            return evaluator.evaluate(source)
        except UnsafeExpressionError as exc:
            raise UnsafeExpressionError(f"{template.name}: {where}: {exc}") from None


_OPERATORS = set("*/+-=÷×<>()")


def _in_arithmetic(text: str, m: re.Match) -> bool:
    """Whether a solution placeholder sits in arithmetic: next to an operator, or in <<...>>."""
    before, after = text[: m.start()].rstrip(), text[m.end() :].lstrip()
    if (before and before[-1] in _OPERATORS) or (after and after[0] in _OPERATORS):
        return True
    if after.startswith("times") or after.startswith("time(s)"):
        return True
    return before.rfind("<<") > before.rfind(">>")


_INCONSISTENT = "'####' number differs from #answer"


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return format_value(value)


def _disagreement(template: Template, inst: Instance) -> str:
    """One concrete draw where '####' and #answer differ: the variables and both numbers."""
    drawn = ", ".join(f"{k}={_show(v)}" for k, v in inst.variables.items())
    solution = template.answer_annotated.rsplit("####", 1)[-1].strip()
    gold = parse_gold(inst.row["answer"])
    return (
        f"For example, with {drawn}: '#answer: {template.answer_expression}' gives "
        f"{format_value(inst.answer_value)}, but the worked solution's '#### {solution}' gives "
        f"{format_value(gold)}"
    )


def _consistency_problem(inst: Instance) -> str:
    """Why a rendered instance is unusable ('' if fine): slots left, or '####' != #answer."""
    if QUESTION_SLOT.search(inst.row["question"]):
        return "placeholder left in question"
    try:
        gold = parse_gold(inst.row["answer"])
    except ValueError:
        return "no number after '####'"
    value = inst.answer_value
    if not isinstance(value, (int, float, Fraction)) or isinstance(value, bool):
        return "#answer is not a number"
    if abs(gold - float(value)) > 1e-6 * max(1.0, abs(float(value))):
        return _INCONSISTENT
    return ""


def instantiate_templates(templates: list[Template], per_template: int, seed: int = 0,
                          max_tries_per_instance: int = 2_000, progress: bool = True,
                          strategy: str = "construct") -> tuple[list[Problem], list[str]]:
    """Instantiate every template: (problems of the ones that succeeded, failure messages)."""
    from tqdm import tqdm

    from cca_ray.data.gsm_symbolic import Problem

    engine = TemplateEngine(seed=seed, max_tries_per_instance=max_tries_per_instance,
                            strategy=strategy)
    problems: list[Problem] = []
    failures: list[str] = []
    for template in tqdm(templates, desc="instantiating templates", unit="template",
                         disable=not progress):
        result = engine.instantiate(template, per_template)
        if result.ok:
            problems += [Problem(**inst.row) for inst in result.instances]
        else:
            failures.append(result.error)
    return problems, failures
