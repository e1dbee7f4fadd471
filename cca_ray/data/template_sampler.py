"""Drawing GSM-Symbolic template variables by construction instead of by rejection.

Rejection sampling draws every ``#init`` variable and retries until the ``#conditions`` hold;
tight divisibility chains (``is_int(frac1 * t)``, ``divides(x, m + n)``) accept one draw in
hundreds or thousands. A ``ConstructionPlan`` instead builds the satisfying values:

* Every single-name assignment that draws from a collection fixed by the template alone
  (``$x = range(2, 50)``, ``$f = fractions``, ``x = sample([..])``) is a *choice* variable with a
  finite domain. Assignments without randomness are *derived* (``y = x * 2``); anything else
  (``sample(pool, 3)``, a range that depends on another variable) is *opaque* and stays with the
  ordinary draw.
* A condition whose variables all trace back (through derived ones) to choice variables is
  *constructible*. Choice variables linked by constructible conditions form a *component*; the
  rest are drawn as before.
* Within a component the variables are ordered (small domains first; a variable that is the
  target of an ``x == expr`` or divisibility condition after the others), and each condition is
  checked at the variable that completes it. The values a variable may take given the earlier
  ones are its *candidates*: ``x == expr`` is looked up; a divisibility condition
  (``divides(A, B)``, ``A % B == 0``, ``is_int(A / B)``, ``is_int(c * x)``, with ``x`` a plain
  factor of the product A / B) keeps the multiples of the denominator of ``x``'s coefficient,
  computed as a range, i.e. the divisor's multiples are drawn instead of values to reject (a
  float coefficient such as ``p / 100`` counts when it is a ratio of small integers and
  ``is_int``'s float tolerance cannot blur multiples and non-multiples); any other condition is
  evaluated on each remaining value (beyond SCAN_LIMIT values it is left to the engine's check
  of the whole draw, i.e. to rejection). Candidate lists are memoised on the earlier values the
  conditions read.

Distribution (what "uniform" means here):

* *exact* components: when a depth-first enumeration of every satisfying prefix (all variables
  but the last) together with the last variable's candidates fits a work budget (EXACT_WORK), a
  draw picks prefix j with probability |candidates_j| / total and then one of its candidates
  uniformly. Every satisfying tuple has probability 1 / total: exactly the distribution of
  rejection sampling. An empty enumeration proves the conditions unsatisfiable.
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

The engine (TemplateEngine, strategy "construct") hands a template to its plan only when plain
rejection accepts few draws, and it checks every constructed draw against all conditions and
the answer, so a plan can only be wrong in how often it proposes a tuple, never in what is
emitted.
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
from typing import TYPE_CHECKING, Any

from cca_ray.data.safe_eval import (
    SafeEvaluator,
    UnsafeExpressionError,
    dotted_name,
    labeled,
    make_functions,
    unwrap,
)

if TYPE_CHECKING:
    from cca_ray.data.templates import Template

RNG_FUNCTIONS = frozenset(
    {"sample", "sample_sequential", "shuffle_list", "randint", "np.random.randint", "random.randint"}
)
EXACT_WORK = 200_000  # expression nodes one exact enumeration may evaluate (~0.2 s)
EXACT_PREFIXES = 100_000  # prefixes (tuples of all but the last variable) an exact component holds
MEMO_ENTRIES = 50_000  # memoised candidate lists per variable
MAX_DENOMINATOR = 1_000  # a float coefficient counts as p/q only for q up to this
WARMUP = 20  # proposals of a sequential component that only estimate its largest weight
SCAN_LIMIT = 5_000  # values a sequential draw evaluates conditions on; beyond, they are rejected
_SCAN_ERRORS = (ZeroDivisionError, UnsafeExpressionError, ArithmeticError, TypeError, ValueError)


def _read_names(tree: ast.AST) -> set[str]:
    """Variable names an expression reads (function names such as ``is_int`` excluded)."""
    callee: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            while isinstance(f, ast.Attribute):
                f = f.value
            callee.add(id(f))
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in callee}


def _calls(tree: ast.AST) -> set[str]:
    return {dotted_name(n.func) or "" for n in ast.walk(tree) if isinstance(n, ast.Call)}


def _parse(source: str) -> ast.Expression | None:
    try:
        return ast.parse(source.strip(), mode="eval")
    except SyntaxError:
        return None


@dataclass
class _Derived:
    index: int  # position among the template's assignments
    targets: tuple[str, ...]
    expression: str
    roots: frozenset[str]


@dataclass
class _Condition:
    number: int  # 1-based, as in the template's #conditions
    source: str
    tree: ast.expr
    roots: frozenset[str]  # choice variables it depends on
    derived: tuple[_Derived, ...]  # derived assignments it reads (transitively), in order


@dataclass
class _Fast:
    """A fast candidate filter of one condition for its completing variable."""

    kind: str  # "equal": x == other; "multiple": x * prod(factors) must be an integer
    other: str = ""
    factors: tuple[tuple[str, int], ...] = ()  # (expression, +1 numerator / -1 denominator)
    constants: dict[str, Any] = field(default_factory=dict)  # factors that read no variable


@dataclass
class _Step:
    """One variable of a component and the conditions it completes."""

    var: str
    domain: Sequence[Any]
    checks: list[_Condition]  # completed here, evaluated value by value
    fast: list[tuple[_Condition, _Fast]]  # completed here, answered by a fast filter
    key: tuple[str, ...]  # earlier variables these conditions depend on
    before: tuple[_Derived, ...]  # derived values computable from the earlier variables
    after: tuple[_Derived, ...]  # derived values that need this variable
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
class _Component:
    """Choice variables linked by conditions, in drawing order.

    Exact components hold every satisfying tuple as (prefix, positions of the last variable),
    with cumulative counts for drawing one tuple uniformly.
    """

    steps: list[_Step]
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

    components: list[_Component]
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

    def _candidates(self, step: _Step, values: dict[str, Any], strict: bool = False
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
        evaluator = SafeEvaluator(env, _FUNCTIONS)
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
        except _SCAN_ERRORS:
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

    def _holds(self, evaluator: SafeEvaluator, step: _Step, i: int,
               checks: list[_Condition]) -> bool:
        evaluator.variables[step.var] = step.domain[i]  # type: ignore[index]
        try:
            for d in step.after:
                self._assign(evaluator, d)
            return all(self._evaluate(evaluator, c.source) for c in checks)
        except _SCAN_ERRORS:
            return False

    def _assign(self, evaluator: SafeEvaluator, d: _Derived) -> None:
        value = self._evaluate(evaluator, d.expression)
        env = evaluator.variables
        if len(d.targets) == 1:
            env[d.targets[0]] = labeled(value)  # type: ignore[index]
        else:
            if not isinstance(value, (list, tuple)) or len(value) != len(d.targets):
                raise ValueError("does not unpack")
            for t, v in zip(d.targets, value, strict=True):
                env[t] = labeled(v)  # type: ignore[index]

    def _equal(self, step: _Step, fast: _Fast, evaluator: SafeEvaluator) -> list[int] | None:
        """Positions whose value equals the other side (None: values cannot be looked up)."""
        index = step.value_index()
        if index is None:
            return None
        target = unwrap(self._evaluate(evaluator, fast.other))
        try:
            return index.get(target, [])
        except TypeError:
            return None

    def _denominator(self, step: _Step, fast: _Fast, evaluator: SafeEvaluator,
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

    def _multiples_of(self, step: _Step, q: int, positions: Sequence[int] | None
                      ) -> Sequence[int]:
        domain = step.domain
        if positions is None and isinstance(domain, range):
            return _multiples(domain, q)
        source = range(len(domain)) if positions is None else positions
        self.work += len(source) // 8
        return [i for i in source if domain[i] % q == 0]


@functools.lru_cache(maxsize=65_536)
def _float_ratio(value: float) -> tuple[int, int] | None:
    """(p, q) with p/q == value up to float rounding and q <= MAX_DENOMINATOR, else None."""
    if not math.isfinite(value):
        return None
    exact = Fraction(value).limit_denominator(MAX_DENOMINATOR)
    if abs(float(exact) - value) > 1e-12 * max(1.0, abs(value)):
        return None
    return exact.numerator, exact.denominator


def _multiples(domain: range, q: int) -> range:
    """Positions i of domain with domain[i] % q == 0, as a range (solves i*step = -start mod q)."""
    g = math.gcd(domain.step, q)
    if domain.start % g:
        return range(0)
    period = q // g
    if period == 1:
        return range(len(domain))
    first = (-domain.start // g) * pow(domain.step // g, -1, period) % period
    return range(first, len(domain), period)


_FUNCTIONS = make_functions(random.Random(0))


class _TooLarge(Exception):
    """An exact enumeration met a scan over SCAN_LIMIT values."""


# ---------------------------------------------------------------- building a plan


def build_plan(template: Template, pools: dict[str, Any],
               exact_work: int = EXACT_WORK) -> ConstructionPlan:
    """Analyse a template's assignments and conditions into a ConstructionPlan (see module doc)."""
    evaluator = SafeEvaluator(dict(pools), _FUNCTIONS)
    kind: dict[str, str] = {}  # name -> choice | derived | opaque
    domains: dict[str, Sequence[Any]] = {}
    position: dict[str, int] = {}
    roots: dict[str, frozenset[str]] = {}
    derived: dict[str, _Derived] = {}
    for i, a in enumerate(template.assignments):
        if any(t in kind for t in a.targets):
            return ConstructionPlan([], pools, note=f"'{a.line}' assigns a name twice")
        tree = _parse(a.expression)
        if tree is None:
            return ConstructionPlan([], pools, note=f"'{a.line}' does not parse")
        reads = sorted(_read_names(tree) & kind.keys())
        random_call = bool(_calls(tree) & RNG_FUNCTIONS)
        domain = None if reads else _static_domain(tree, a.draw, evaluator)
        for t in a.targets:
            position[t] = i
        if domain is not None and len(a.targets) == 1:
            (name,) = a.targets
            kind[name], domains[name], roots[name] = "choice", domain, frozenset({name})
        elif random_call or a.draw:
            for t in a.targets:
                kind[t], roots[t] = "opaque", frozenset({t})
        else:
            rooted = frozenset().union(*(roots[r] for r in reads)) if reads else frozenset()
            d = _Derived(i, a.targets, a.expression, rooted)
            for t in a.targets:
                kind[t], roots[t], derived[t] = "derived", rooted, d

    conditions: list[_Condition] = []
    for number, source in enumerate(template.conditions, 1):
        tree = _parse(source)
        if tree is None or _calls(tree) & RNG_FUNCTIONS:
            continue
        reads = _read_names(tree)
        if not reads <= kind.keys() | pools.keys():
            continue  # an unknown name: the ordinary check reports it
        reads &= kind.keys()
        rooted = frozenset().union(*(roots[r] for r in reads)) if reads else frozenset()
        if not rooted or any(kind[r] != "choice" for r in rooted):
            continue
        conditions.append(_Condition(number, source.strip(), tree.body, rooted,
                                     _derived_chain(reads, derived)))
    if not conditions:
        return ConstructionPlan([], pools, note="no condition constrains only drawn variables")

    parent = {v: v for c in conditions for v in c.roots}

    def find(v: str) -> str:
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for c in conditions:
        first, *rest = sorted(c.roots, key=position.__getitem__)
        for v in rest:
            parent[find(v)] = find(first)
    groups: dict[str, list[str]] = {}
    for v in sorted(parent, key=position.__getitem__):
        groups.setdefault(find(v), []).append(v)

    plan = ConstructionPlan([], pools)
    for members in groups.values():
        mine = [c for c in conditions if c.roots <= set(members)]
        targets = {t for c in mine for t in _fast_targets(c)}
        order = sorted(members, key=lambda v: (v in targets, len(domains[v]), position[v]))
        steps = _steps(order, mine, domains)
        comp = _Component(steps)
        _enumerate(plan, comp, exact_work)
        plan.components.append(comp)
    return plan


def _static_domain(tree: ast.Expression, draw: bool, evaluator: SafeEvaluator
                   ) -> Sequence[Any] | None:
    """The values a single-name assignment draws from, if the template alone fixes them."""
    body = tree.body
    try:
        if (isinstance(body, ast.Call) and dotted_name(body.func) == "sample"
                and len(body.args) == 1 and not body.keywords
                and not _calls(body.args[0]) & RNG_FUNCTIONS):
            value = evaluator.evaluate(ast.unparse(body.args[0]))
            if not isinstance(value, (list, tuple, range)):
                return None
            if draw and any(isinstance(v, (list, range)) for v in value):
                return None  # '$x = sample(...)' of collections draws twice
        elif draw and (not _calls(tree) & RNG_FUNCTIONS or _unshuffled(body) is not None):
            value = evaluator.evaluate(ast.unparse(_unshuffled(body) or body))
            if not isinstance(value, (list, range)):
                return None
        else:
            return None
    except (UnsafeExpressionError, ArithmeticError, TypeError, ValueError):
        return None  # the ordinary draw reports it
    if len(value) == 0:
        return None
    return value if isinstance(value, range) else [labeled(v) for v in value]


_ORDER_BLIND = ("list", "fix_floats")  # element-wise: drawing one element ignores the order


def _unshuffled(body: ast.expr) -> ast.expr | None:
    """``fix_floats(shuffle_list(E))`` and the like with the shuffle dropped: one element drawn
    from a shuffled list is drawn uniformly from the list. None for any other expression."""
    chain, node = [], body
    while (isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords
           and dotted_name(node.func) in (*_ORDER_BLIND, "shuffle_list")):
        chain.append(dotted_name(node.func))
        node = node.args[0]
    if "shuffle_list" not in chain or _calls(node) & RNG_FUNCTIONS:
        return None
    for name in reversed(chain):
        node = ast.Call(ast.Name("list" if name == "shuffle_list" else name), [node], [])
    return ast.fix_missing_locations(node)


def _derived_chain(reads: set[str], derived: dict[str, _Derived]) -> tuple[_Derived, ...]:
    """The derived assignments an expression needs, transitively, in assignment order."""
    seen: dict[int, _Derived] = {}
    todo = [r for r in reads if r in derived]
    while todo:
        d = derived[todo.pop()]
        if d.index in seen:
            continue
        seen[d.index] = d
        tree = _parse(d.expression)
        todo += [r for r in (_read_names(tree) if tree else ()) if r in derived]
    return tuple(seen[i] for i in sorted(seen))


def _divisibility(tree: ast.expr) -> tuple[ast.expr, ast.expr | None] | None:
    """(A, B) when the condition says A / B is an integer (B None: A itself is one)."""
    if isinstance(tree, ast.Call) and not tree.keywords:
        name = dotted_name(tree.func)
        if name == "divides" and len(tree.args) == 2:
            return tree.args[0], tree.args[1]
        if name == "is_int" and len(tree.args) == 1:
            return tree.args[0], None
    if (isinstance(tree, ast.Compare) and len(tree.ops) == 1 and isinstance(tree.ops[0], ast.Eq)):
        for side, other in ((tree.left, tree.comparators[0]), (tree.comparators[0], tree.left)):
            if (isinstance(side, ast.BinOp) and isinstance(side.op, ast.Mod)
                    and isinstance(other, ast.Constant) and other.value == 0):
                return side.left, side.right
    return None


def _factors(node: ast.expr, sign: int) -> list[tuple[ast.expr, int]]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _factors(node.left, sign) + _factors(node.right, sign)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return _factors(node.left, sign) + _factors(node.right, -sign)
    return [(node, sign)]


def _fast_filter(cond: _Condition, var: str) -> _Fast | None:
    """A fast filter of cond for var: x == expr, or x a plain numerator factor of A / B."""
    tree = cond.tree
    reaches = {t: var in d.roots for d in cond.derived for t in d.targets}

    def free_of_var(node: ast.expr) -> bool:
        return not any(n == var or reaches.get(n, False) for n in _read_names(node))

    if isinstance(tree, ast.Compare) and len(tree.ops) == 1 and isinstance(tree.ops[0], ast.Eq):
        for side, other in ((tree.left, tree.comparators[0]), (tree.comparators[0], tree.left)):
            if isinstance(side, ast.Name) and side.id == var and free_of_var(other):
                return _Fast("equal", other=ast.unparse(other))
    parts = _divisibility(tree)
    if parts is None:
        return None
    numerator, denominator = parts
    factors = _factors(numerator, 1) + (_factors(denominator, -1) if denominator is not None else [])
    mine = [(f, s) for f, s in factors if isinstance(f, ast.Name) and f.id == var]
    rest = [(f, s) for f, s in factors if not (isinstance(f, ast.Name) and f.id == var)]
    if len(mine) != 1 or mine[0][1] != 1 or not all(free_of_var(f) for f, _ in rest):
        return None
    factors = tuple((ast.unparse(f), s) for f, s in rest)
    constants = {}
    for (source, _), (node, _) in zip(factors, rest, strict=True):
        if not _read_names(node):
            try:
                constants[source] = unwrap(SafeEvaluator({}, _FUNCTIONS).evaluate(source))
            except _SCAN_ERRORS:
                pass
    return _Fast("multiple", factors=factors, constants=constants)


def _fast_targets(cond: _Condition) -> list[str]:
    return [v for v in sorted(cond.roots) if _fast_filter(cond, v) is not None]


def _steps(order: list[str], conditions: list[_Condition], domains: dict[str, Sequence[Any]]
           ) -> list[_Step]:
    """The component's steps: per variable, the conditions it completes and what they need."""
    steps = []
    for k, var in enumerate(order):
        earlier = set(order[:k])
        done = [c for c in conditions if var in c.roots and c.roots <= earlier | {var}]
        checks, fast = [], []
        for c in done:
            f = _fast_filter(c, var)
            (fast.append((c, f)) if f is not None else checks.append(c))
        key = tuple(v for v in order[:k] if any(v in c.roots for c in done))
        chain: dict[int, _Derived] = {d.index: d for c in done for d in c.derived}
        needed = [chain[i] for i in sorted(chain)]
        before = tuple(d for d in needed if var not in d.roots)
        after = tuple(d for d in needed if var in d.roots)
        steps.append(_Step(var, domains[var], checks, fast, key, before, after))
    return steps


def _enumerate(plan: ConstructionPlan, comp: _Component, budget: int) -> bool:
    """Fill comp with every satisfying tuple (each prefix with the last variable's candidates);
    False, leaving comp sequential, when that takes more than budget work units or prefixes."""
    start = plan.work
    steps, last = comp.steps, len(comp.steps) - 1
    prefixes: list[tuple[int, ...]] = []
    lasts: list[Sequence[int]] = []
    values: dict[str, Any] = {}
    prefix: list[int] = []

    def visit(k: int) -> bool:
        if plan.work - start > budget or len(prefixes) > EXACT_PREFIXES:
            return False
        step = steps[k]
        candidates = plan._candidates(step, values, strict=True)
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


