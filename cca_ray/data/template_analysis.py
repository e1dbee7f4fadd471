"""Analysing a GSM-Symbolic template into a ConstructionPlan (``construction_plan``): which
variables are drawn from fixed collections, which conditions link them, and in what order to draw
them so that each condition narrows the values of the variable that completes it.

Rejection sampling draws every ``#init`` variable and retries until the ``#conditions`` hold;
tight divisibility chains (``is_int(frac1 * t)``, ``divides(x, m + n)``) accept very few draws.
A plan instead builds the satisfying values:

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
  checked at the variable that completes it, with a fast filter where its shape allows one.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

from cca_ray.data.construction_plan import (
    FUNCTIONS,
    SCAN_ERRORS,
    Component,
    Condition,
    ConstructionPlan,
    Derived,
    FastFilter,
    Step,
)
from cca_ray.data.safe_eval import SafeEvaluator, dotted_name
from cca_ray.data.template_functions import UnsafeExpressionError, labeled, unwrap
from cca_ray.data.template_parsing import Template

RNG_FUNCTIONS = frozenset(
    {"sample", "sample_sequential", "shuffle_list", "randint", "np.random.randint", "random.randint"}
)
EXACT_WORK = 200_000  # expression nodes one exact enumeration may evaluate


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


def build_plan(template: Template, pools: dict[str, Any],
               exact_work: int = EXACT_WORK) -> ConstructionPlan:
    """Analyse a template's assignments and conditions into a ConstructionPlan (see module doc)."""
    evaluator = SafeEvaluator(dict(pools), FUNCTIONS)
    kind: dict[str, str] = {}  # name -> choice | derived | opaque
    domains: dict[str, Sequence[Any]] = {}
    position: dict[str, int] = {}
    roots: dict[str, frozenset[str]] = {}
    derived: dict[str, Derived] = {}
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
            d = Derived(i, a.targets, a.expression, rooted)
            for t in a.targets:
                kind[t], roots[t], derived[t] = "derived", rooted, d

    conditions: list[Condition] = []
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
        conditions.append(Condition(number, source.strip(), tree.body, rooted,
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
        comp = Component(steps)
        plan.enumerate_exact(comp, exact_work)
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


def _derived_chain(reads: set[str], derived: dict[str, Derived]) -> tuple[Derived, ...]:
    """The derived assignments an expression needs, transitively, in assignment order."""
    seen: dict[int, Derived] = {}
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


def _fast_filter(cond: Condition, var: str) -> FastFilter | None:
    """A fast filter of cond for var: x == expr, or x a plain numerator factor of A / B."""
    tree = cond.tree
    reaches = {t: var in d.roots for d in cond.derived for t in d.targets}

    def free_of_var(node: ast.expr) -> bool:
        return not any(n == var or reaches.get(n, False) for n in _read_names(node))

    if isinstance(tree, ast.Compare) and len(tree.ops) == 1 and isinstance(tree.ops[0], ast.Eq):
        for side, other in ((tree.left, tree.comparators[0]), (tree.comparators[0], tree.left)):
            if isinstance(side, ast.Name) and side.id == var and free_of_var(other):
                return FastFilter("equal", other=ast.unparse(other))
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
                constants[source] = unwrap(SafeEvaluator({}, FUNCTIONS).evaluate(source))
            except SCAN_ERRORS:
                pass
    return FastFilter("multiple", factors=factors, constants=constants)


def _fast_targets(cond: Condition) -> list[str]:
    return [v for v in sorted(cond.roots) if _fast_filter(cond, v) is not None]


def _steps(order: list[str], conditions: list[Condition], domains: dict[str, Sequence[Any]]
           ) -> list[Step]:
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
        chain: dict[int, Derived] = {d.index: d for c in done for d in c.derived}
        needed = [chain[i] for i in sorted(chain)]
        before = tuple(d for d in needed if var not in d.roots)
        after = tuple(d for d in needed if var in d.roots)
        steps.append(Step(var, domains[var], checks, fast, key, before, after))
    return steps
