"""A template's construction plan: how its constrained choice variables are drawn so that the
conditions hold by construction, instead of drawing everything and rejecting (the plan is built by
``template_analysis.build_plan``; the engine in ``templates`` decides when to use it).

Within a component (choice variables linked by conditions, in drawing order) each condition is
checked at the variable that completes it. The values a variable may take given the earlier ones
are its *candidates*: ``x == expr`` is looked up; a divisibility condition (``divides(A, B)``,
``A % B == 0``, ``is_int(A / B)``, ``is_int(c * x)``, with ``x`` a plain factor of the product
A / B) keeps the multiples of the denominator of ``x``'s coefficient, computed as a range, i.e.
the divisor's multiples are drawn instead of values to reject (a float coefficient such as
``p / 100`` counts when it is a ratio of small integers and ``is_int``'s float tolerance cannot
blur multiples and non-multiples); any other condition is evaluated on each remaining value
(beyond SCAN_LIMIT values it is left to the engine's check of the whole draw, i.e. to rejection).
Candidate lists are memoised on the earlier values the conditions read.

Distribution (what "uniform" means here):

* *exact* components: when a depth-first enumeration of every satisfying prefix (all variables
  but the last) together with the last variable's candidates fits a work budget, a draw picks
  prefix j with probability |candidates_j| / total and then one of its candidates uniformly.
  Every satisfying tuple has probability 1 / total: exactly the distribution of rejection
  sampling. An empty enumeration proves the conditions unsatisfiable.
* *sequential* components (larger ones): a proposal draws each variable uniformly from its
  candidates given the earlier variables (a variable without candidates: redraw). A satisfying
  tuple is proposed with probability proportional to 1 / w, w = prod_i |candidates_i| over the
  variables that complete a condition, which favours tuples whose earlier values leave few
  completions (a large divisor's few multiples over a small divisor's many). With the
  correction on (the engine's default) a proposal is accepted with probability w / M, M the
  largest w seen in this instantiation after WARMUP proposals that only estimate it: uniform
  over the satisfying tuples once M has reached the true maximum (a later, larger w raises M;
  until then such tuples are under-represented). Without it (``bounds=None``) the draw is the
  tilted proposal itself.

The engine checks every constructed draw against all conditions and the answer, so a plan can
only be wrong in how often it proposes a tuple, never in what is emitted.
"""

from __future__ import annotations

import ast
import bisect
import functools
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from cca_ray.data.safe_eval import SafeEvaluator
from cca_ray.data.template_functions import UnsafeExpressionError, labeled, make_functions, unwrap

EXACT_PREFIXES = 100_000  # prefixes (tuples of all but the last variable) an exact component holds
MEMO_ENTRIES = 50_000  # memoised candidate lists per variable
MAX_DENOMINATOR = 1_000  # a float coefficient counts as p/q only for q up to this
WARMUP = 20  # proposals of a sequential component that only estimate its largest weight
SCAN_LIMIT = 5_000  # values a sequential draw evaluates conditions on; beyond, they are rejected
# errors that make a value fail a condition (or a constant unknown) rather than the template
SCAN_ERRORS = (ZeroDivisionError, UnsafeExpressionError, ArithmeticError, TypeError, ValueError)
# the helper functions for expressions that draw nothing (random ones bound to a fixed seed)
FUNCTIONS = make_functions(random.Random(0))


@dataclass
class Derived:
    """An assignment without randomness (``y = x * 2``) and the choice variables it depends on."""

    index: int  # position among the template's assignments
    targets: tuple[str, ...]
    expression: str
    roots: frozenset[str]


@dataclass
class Condition:
    """A condition on choice variables only, so it can be met by construction."""

    number: int  # 1-based, as in the template's #conditions
    source: str
    tree: ast.expr
    roots: frozenset[str]  # choice variables it depends on
    derived: tuple[Derived, ...]  # derived assignments it reads (transitively), in order


@dataclass
class FastFilter:
    """A fast candidate filter of one condition for its completing variable."""

    kind: str  # "equal": x == other; "multiple": x * prod(factors) must be an integer
    other: str = ""
    factors: tuple[tuple[str, int], ...] = ()  # (expression, +1 numerator / -1 denominator)
    constants: dict[str, Any] = field(default_factory=dict)  # factors that read no variable


@dataclass
class Step:
    """One variable of a component and the conditions it completes."""

    var: str
    domain: Sequence[Any]
    checks: list[Condition]  # completed here, evaluated value by value
    fast: list[tuple[Condition, FastFilter]]  # completed here, answered by a fast filter
    key: tuple[str, ...]  # earlier variables these conditions depend on
    before: tuple[Derived, ...]  # derived values computable from the earlier variables
    after: tuple[Derived, ...]  # derived values that need this variable
    memo: dict[tuple, list[int]] = field(default_factory=dict)
    _index: dict[Any, list[int]] | None = None
    _ints: bool | None = None

    @property
    def conditions(self) -> list[int]:
        return sorted([c.number for c in self.checks] + [c.number for c, _ in self.fast])

    def value_index(self) -> dict[Any, list[int]] | None:
        """Domain value -> positions, for equality look-ups (None if values are unhashable)."""
        if self._index is None:
            index: dict[Any, list[int]] = {}
            try:
                for i, v in enumerate(self.domain):
                    index.setdefault(unwrap(v), []).append(i)
            except TypeError:
                return None
            self._index = index
        return self._index

    def integer_domain(self) -> bool:
        """Whether every value is a plain int (the multiples filter needs that)."""
        if self._ints is None:
            self._ints = isinstance(self.domain, range) or all(
                type(v) is int for v in self.domain
            )
        return self._ints

    def top(self) -> int:
        """The largest |value| of an integer domain."""
        if isinstance(self.domain, range):
            return max(abs(self.domain[0]), abs(self.domain[-1]))
        return max(abs(v) for v in self.domain)


@dataclass
class Component:
    """Choice variables linked by conditions, in drawing order.

    Exact components hold every satisfying tuple as (prefix, positions of the last variable),
    with cumulative counts for drawing one tuple uniformly.
    """

    steps: list[Step]
    prefixes: list[tuple[int, ...]] | None = None  # None: sequential
    lasts: list[Sequence[int]] = field(default_factory=list)
    cumulative: list[int] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.var for s in self.steps]

    @property
    def exact(self) -> bool:
        return self.prefixes is not None

    @property
    def count(self) -> int:
        """Satisfying tuples of an exact component."""
        return self.cumulative[-1] if self.cumulative else 0


@dataclass
class ConstructionPlan:
    """How to draw a template's constrained choice variables by construction (see module doc)."""

    components: list[Component]
    pools: dict[str, Any]
    note: str = ""  # why a template has no plan (nothing constructible)
    work: int = 0  # expression nodes evaluated (and the like) for candidates so far

    @property
    def constructive(self) -> bool:
        """Whether any condition is solved by construction (else the plan adds nothing)."""
        return bool(self.components)

    @property
    def unsatisfiable(self) -> str:
        """A message when an exhaustive enumeration found no satisfying values ('' otherwise)."""
        for comp in self.components:
            if comp.exact and not comp.count:
                numbers = sorted({n for s in comp.steps for n in s.conditions})
                return (f"no values of {', '.join(comp.names)} within their ranges satisfy "
                        f"conditions {', '.join(map(str, numbers))} (every combination checked)")
        return ""

    def solutions(self, index: int) -> list[dict[str, Any]] | None:
        """Every satisfying assignment of component index (None if it is sequential); for
        checking a plan against brute force."""
        comp = self.components[index]
        if comp.prefixes is None:
            return None
        out = []
        for prefix, lasts in zip(comp.prefixes, comp.lasts, strict=True):
            for last in lasts:
                out.append({s.var: s.domain[i] for s, i in zip(comp.steps, (*prefix, last),
                                                                  strict=True)})
        return out

    def describe(self) -> str:
        """One line per component: its variables and whether it is drawn exactly."""
        out = []
        for comp in self.components:
            kind = f"exact, {comp.count} satisfying tuples" if comp.exact else "sequential"
            out.append(f"{' -> '.join(comp.names)} ({kind})")
        return "; ".join(out) or self.note

    def sample(self, rng: random.Random, bounds: dict[int, tuple[int, int]] | None = None
               ) -> tuple[dict[str, Any] | None, str]:
        """Values of the constrained variables, or (None, why this draw is redrawn).

        bounds (one dict per instantiation, filled here) turns on the uniformity correction of
        sequential components: per component, (proposals so far, largest weight seen).
        """
        values: dict[str, Any] = {}
        for k, comp in enumerate(self.components):
            if comp.prefixes is not None:
                if not comp.count:
                    return None, "construction: conditions unsatisfiable"
                r = rng.randrange(comp.count)
                j = bisect.bisect_right(comp.cumulative, r)
                offset = r - (comp.cumulative[j - 1] if j else 0)
                chosen = (*comp.prefixes[j], comp.lasts[j][offset])
                for step, i in zip(comp.steps, chosen, strict=True):
                    values[step.var] = step.domain[i]
                continue
            weight = 1
            for step in comp.steps:
                candidates = self._candidates(step, values)
                if not candidates:
                    numbers = ", ".join(map(str, step.conditions))
                    return None, (f"construction: no value of {step.var} meets condition(s) "
                                  f"{numbers} given the earlier draws")
                if step.checks or step.fast:
                    weight *= len(candidates)
                values[step.var] = step.domain[candidates[rng.randrange(len(candidates))]]
            if bounds is not None:
                proposals, top = bounds.get(k, (0, 0))
                top = max(top, weight)
                bounds[k] = (proposals + 1, top)
                if proposals < WARMUP:
                    return None, "construction: warm-up draw (sets the uniformity bound)"
                if rng.random() * top >= weight:
                    return None, "construction: redrawn to keep the draws uniform"
        return values, ""

    # ---------------------------------------------------------------- candidates

    def _candidates(self, step: Step, values: dict[str, Any], strict: bool = False
                    ) -> Sequence[int]:
        """Positions in step.domain that meet the conditions completed at this step, given the
        earlier variables' values (memoised on the values the conditions read). Over SCAN_LIMIT
        values to evaluate, strict raises _TooLarge; otherwise those conditions are skipped."""
        try:
            key: tuple | None = tuple(values[v] for v in step.key)
            cached = step.memo.get(key)  # type: ignore[arg-type]
        except TypeError:  # an unhashable value: no memo
            key, cached = None, None
        if cached is not None:
            return cached
        self.work += 8  # the call's own overhead, in evaluated-node units
        env: dict[str, Any] = {**self.pools, **{v: values[v] for v in step.key}}
        evaluator = SafeEvaluator(env, FUNCTIONS)
        positions: Sequence[int] | None = None  # None: the whole domain
        checks = list(step.checks)
        try:
            for d in step.before:
                self._assign(evaluator, d)
            modulus = 1
            factor_values: dict[str, Any] = {}  # shared by the conditions of this call
            for cond, fast in step.fast:
                if fast.kind == "equal":
                    hits = self._equal(step, fast, evaluator)
                    if hits is None:
                        checks.append(cond)
                    elif positions is None:
                        positions = hits
                    else:
                        allowed = set(positions)
                        positions = [i for i in hits if i in allowed]
                    continue
                q = self._denominator(step, fast, evaluator, factor_values)
                if q is None:
                    checks.append(cond)
                elif q == 0:
                    positions = []
                else:
                    modulus = math.lcm(modulus, q)
            if modulus > 1 and positions != []:
                positions = self._multiples_of(step, modulus, positions)
        except SCAN_ERRORS:
            positions = []  # a value every completion needs cannot be computed
        if positions is None:
            positions = range(len(step.domain))
        out: Sequence[int] = positions
        if checks and positions:
            if len(positions) > SCAN_LIMIT:
                if strict:
                    raise _TooLarge
                # too many values to scan on every draw: draw among them and leave these
                # conditions to the engine's check of the whole draw (plain rejection)
                checks = []
            checks.sort(key=lambda c: c.number)
            out = [i for i in positions if self._holds(evaluator, step, i, checks)] \
                if checks else positions
        if key is not None:
            if len(step.memo) >= MEMO_ENTRIES:
                step.memo.clear()
            step.memo[key] = out
        return out

    def _evaluate(self, evaluator: SafeEvaluator, source: str) -> Any:
        try:
            return evaluator.evaluate(source)
        finally:
            self.work += evaluator.steps

    def _holds(self, evaluator: SafeEvaluator, step: Step, i: int,
               checks: list[Condition]) -> bool:
        evaluator.variables[step.var] = step.domain[i]  # type: ignore[index]
        try:
            for d in step.after:
                self._assign(evaluator, d)
            return all(self._evaluate(evaluator, c.source) for c in checks)
        except SCAN_ERRORS:
            return False

    def _assign(self, evaluator: SafeEvaluator, d: Derived) -> None:
        value = self._evaluate(evaluator, d.expression)
        env = evaluator.variables
        if len(d.targets) == 1:
            env[d.targets[0]] = labeled(value)  # type: ignore[index]
        else:
            if not isinstance(value, (list, tuple)) or len(value) != len(d.targets):
                raise ValueError("does not unpack")
            for t, v in zip(d.targets, value, strict=True):
                env[t] = labeled(v)  # type: ignore[index]

    def _equal(self, step: Step, fast: FastFilter, evaluator: SafeEvaluator) -> list[int] | None:
        """Positions whose value equals the other side (None: values cannot be looked up)."""
        index = step.value_index()
        if index is None:
            return None
        target = unwrap(self._evaluate(evaluator, fast.other))
        try:
            return index.get(target, [])
        except TypeError:
            return None

    def _denominator(self, step: Step, fast: FastFilter, evaluator: SafeEvaluator,
                     factor_values: dict[str, Any]) -> int | None:
        """q such that the condition holds exactly for the multiples of q in the (integer)
        domain: the denominator of x's coefficient. 0: no value; None: no fast answer."""
        if not step.integer_domain():
            return None
        numerator, denominator, size, inexact = 1, 1, 1.0, False
        for expression, sign in fast.factors:
            if expression in fast.constants:
                value = fast.constants[expression]
            elif expression in factor_values:
                value = factor_values[expression]
            else:
                value = factor_values[expression] = unwrap(self._evaluate(evaluator, expression))
            if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
                return None
            if isinstance(value, float):
                ratio = _float_ratio(value)
                if ratio is None:
                    return None
                p, q = ratio
                inexact = True
            elif isinstance(value, Fraction):
                p, q = value.numerator, value.denominator
            else:
                p, q = value, 1
            if sign < 0:
                if p == 0:
                    return 0  # division by zero: false (or an error) for every value
                p, q = q, p
            numerator, denominator = numerator * p, denominator * q
            size *= abs(p / q)
        if numerator == 0:
            return 1
        q = abs(denominator) // math.gcd(numerator, denominator)
        if inexact and q > 1:  # is_int's float tolerance must stay far below the spacing 1/q
            if step.top() * size * 1e-9 >= 0.25 / q:
                return None
        return q

    def _multiples_of(self, step: Step, q: int, positions: Sequence[int] | None
                      ) -> Sequence[int]:
        domain = step.domain
        if positions is None and isinstance(domain, range):
            return multiples(domain, q)
        source = range(len(domain)) if positions is None else positions
        self.work += len(source) // 8
        return [i for i in source if domain[i] % q == 0]

    def enumerate_exact(self, comp: Component, budget: int) -> bool:
        """Fill comp with every satisfying tuple (each prefix with the last variable's candidates);
        False, leaving comp sequential, when that takes more than budget work units or prefixes."""
        start = self.work
        steps, last = comp.steps, len(comp.steps) - 1
        prefixes: list[tuple[int, ...]] = []
        lasts: list[Sequence[int]] = []
        values: dict[str, Any] = {}
        prefix: list[int] = []

        def visit(k: int) -> bool:
            if self.work - start > budget or len(prefixes) > EXACT_PREFIXES:
                return False
            step = steps[k]
            candidates = self._candidates(step, values, strict=True)
            if k == last:
                if candidates:
                    prefixes.append(tuple(prefix))
                    lasts.append(candidates)
                return True
            for i in candidates:
                values[step.var] = step.domain[i]
                prefix.append(i)
                ok = visit(k + 1)
                prefix.pop()
                if not ok:
                    return False
            values.pop(step.var, None)
            return True

        # first variables that complete no condition multiply the work by their domain sizes:
        # leave the component to sequential drawing when that product alone exceeds the budget
        free = 1
        for step in steps[:last]:
            if step.checks or step.fast:
                break
            free *= len(step.domain)
        try:
            if free * 8 > budget or not visit(0):
                return False  # the memos stay: sequential drawing reuses them
        except _TooLarge:
            return False
        comp.prefixes, comp.lasts = prefixes, lasts
        comp.cumulative = list(itertools.accumulate(len(c) for c in lasts))
        for step in steps:  # exact draws need no memo
            step.memo.clear()
        return True


@functools.lru_cache(maxsize=65_536)
def _float_ratio(value: float) -> tuple[int, int] | None:
    """(p, q) with p/q == value up to float rounding and q <= MAX_DENOMINATOR, else None."""
    if not math.isfinite(value):
        return None
    exact = Fraction(value).limit_denominator(MAX_DENOMINATOR)
    if abs(float(exact) - value) > 1e-12 * max(1.0, abs(value)):
        return None
    return exact.numerator, exact.denominator


def multiples(domain: range, q: int) -> range:
    """Positions i of domain with domain[i] % q == 0, as a range (solves i*step = -start mod q)."""
    g = math.gcd(domain.step, q)
    if domain.start % g:
        return range(0)
    period = q // g
    if period == 1:
        return range(len(domain))
    first = (-domain.start // g) * pow(domain.step // g, -1, period) % period
    return range(first, len(domain), period)


class _TooLarge(Exception):
    """An exact enumeration met a scan over SCAN_LIMIT values."""
