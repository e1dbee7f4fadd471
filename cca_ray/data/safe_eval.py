"""A whitelisted evaluator for GSM-Symbolic template expressions: parsed AST, never eval/exec.

Templates are data written by others, so their expressions get only arithmetic, comparisons,
boolean logic, literals, list/tuple indexing, the helper functions of ``template_functions`` and
the variables of the instance. No attribute access (a few dotted helper names such as
``np.arange`` are looked up as whole names), no dunder names, no lambdas, comprehensions or
imports; number sizes, collection sizes, string lengths, node count and wall time are bounded.
"""

from __future__ import annotations

import ast
import functools
import operator
import random
import time
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

from cca_ray.data.template_functions import (
    MAX_COLLECTION,
    Labeled,
    UnsafeExpressionError,
    check_size,
    make_functions,
    unwrap,
)

MAX_SOURCE_CHARS = 2_000  # one template expression; the longest real one is ~400 characters
MAX_STRING_CHARS = 1_000  # any string value, literal or computed
MAX_INT_BITS = 256  # |int| < 2**256; GSM numbers are far smaller
MAX_STEPS = 200_000  # AST nodes evaluated per expression
MAX_SECONDS = 1.0  # wall time per expression


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_REFUSED: dict[type, str] = {
    ast.Lambda: "lambda expressions are not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "generator expressions are not allowed",
    ast.NamedExpr: "assignment expressions (:=) are not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
    ast.Starred: "starred expressions are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
}


@functools.lru_cache(maxsize=4096)
def _parse(source: str) -> ast.Expression:
    """Parse once per distinct expression (templates evaluate the same ones thousands of times)."""
    try:
        return ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise UnsafeExpressionError(f"not a valid expression: {exc.msg}") from None


@functools.lru_cache(maxsize=4096)
def _checked(source: str) -> ast.Expression:
    """The parsed expression once it has no dunder name (checked once per distinct source, since
    samplers evaluate the same conditions thousands of times; a refusal is raised, never cached)."""
    tree = _parse(source)
    for node in ast.walk(tree):  # name the worst offence first, before evaluating anything
        name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
        if isinstance(name, str) and name.startswith("__"):
            raise UnsafeExpressionError(f"dunder names are not allowed ({name!r})")
    return tree


def dotted_name(node: ast.AST) -> str | None:
    """'np.random.randint' for an Attribute chain over a Name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


class SafeEvaluator:
    """Evaluates one expression string against variables and helper functions.

    ``functions`` maps (possibly dotted) names to callables; variables are plain values.
    """

    def __init__(self, variables: Mapping[str, Any], functions: Mapping[str, Callable[..., Any]]):
        self.variables = variables
        self.functions = functions
        self._steps = 0
        self._deadline = 0.0

    @property
    def steps(self) -> int:
        """AST nodes the last evaluate() visited (a cost measure callers can budget on)."""
        return self._steps

    def evaluate(self, source: str) -> Any:
        if len(source) > MAX_SOURCE_CHARS:
            raise UnsafeExpressionError(
                f"expression is {len(source)} characters long (limit {MAX_SOURCE_CHARS})"
            )
        tree = _checked(source)
        self._steps = 0
        self._deadline = time.monotonic() + MAX_SECONDS
        return self._eval(tree.body)

    # The visitor: one branch per allowed node type; everything else is refused.
    def _eval(self, node: ast.AST) -> Any:
        self._steps += 1
        if self._steps > MAX_STEPS:
            raise UnsafeExpressionError(f"expression needs more than {MAX_STEPS} steps")
        if self._steps % 1024 == 0 and time.monotonic() > self._deadline:
            raise UnsafeExpressionError(f"expression ran longer than {MAX_SECONDS} s")
        if type(node) in _REFUSED:
            raise UnsafeExpressionError(_REFUSED[type(node)])

        if isinstance(node, ast.Constant):
            return self._check_value(node.value)
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if isinstance(node, ast.Attribute):
            raise UnsafeExpressionError(
                f"attribute access is not allowed ('.{node.attr}'); only these dotted helpers "
                f"may be called: {sorted(n for n in self.functions if '.' in n)}"
            )
        if isinstance(node, (ast.List, ast.Tuple)):
            check_size(len(node.elts), "literal")
            items = [self._eval(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.UnaryOp):
            value = unwrap(self._eval(node.operand))
            if isinstance(node.op, ast.USub):
                return self._check_value(-value)
            if isinstance(node.op, ast.UAdd):
                return +value
            if isinstance(node.op, ast.Not):
                return not value
            raise UnsafeExpressionError(f"operator {type(node.op).__name__} is not allowed")
        if isinstance(node, ast.BinOp):
            return self._binop(node)
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                result: Any = True
                for v in node.values:
                    result = self._eval(v)
                    if not result:
                        return result
                return result
            result = False
            for v in node.values:
                result = self._eval(v)
                if result:
                    return result
            return result
        if isinstance(node, ast.Compare):
            left = unwrap(self._eval(node.left))
            for op, comp in zip(node.ops, node.comparators, strict=True):
                right = unwrap(self._eval(comp))
                if type(op) not in _CMPOPS:
                    raise UnsafeExpressionError(f"comparison {type(op).__name__} is not allowed")
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self._eval(node.body) if self._eval(node.test) else self._eval(node.orelse)
        if isinstance(node, ast.Subscript):
            container = self._eval(node.value)
            if isinstance(container, Labeled):  # a pool pair: [0] is its text, [1] its number
                container = (container.text, container.value)
            if not isinstance(container, (list, tuple, str, range)):
                raise UnsafeExpressionError(
                    f"indexing is allowed on lists, tuples and strings, not {type(container)}"
                )
            return self._check_value(container[self._index(node.slice)])
        if isinstance(node, ast.Call):
            return self._call(node)
        raise UnsafeExpressionError(f"{type(node).__name__} is not allowed in template expressions")

    def _name(self, name: str) -> Any:
        if name.startswith("__"):
            raise UnsafeExpressionError(f"dunder names are not allowed ({name!r})")
        if name in self.variables:
            return self.variables[name]
        if name in self.functions:
            raise UnsafeExpressionError(f"function {name!r} must be called, not used as a value")
        raise UnsafeExpressionError(f"unknown name {name!r}")

    def _index(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Slice):
            parts = [None if p is None else unwrap(self._eval(p)) for p in
                     (node.lower, node.upper, node.step)]
            return slice(*parts)
        index = unwrap(self._eval(node))
        if not isinstance(index, int):
            raise UnsafeExpressionError(f"index must be an integer, got {index!r}")
        return index

    def _binop(self, node: ast.BinOp) -> Any:
        if type(node.op) not in _BINOPS:
            raise UnsafeExpressionError(f"operator {type(node.op).__name__} is not allowed")
        left, right = unwrap(self._eval(node.left)), unwrap(self._eval(node.right))
        if isinstance(node.op, ast.Pow):
            self._check_pow(left, right)
        if isinstance(node.op, ast.Mult):
            self._check_repeat(left, right)
        try:
            result = _BINOPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ZeroDivisionError("division by zero in template expression") from None
        except OverflowError:
            raise UnsafeExpressionError("number too large") from None
        return self._check_value(result)

    @staticmethod
    def _check_pow(base: Any, exponent: Any) -> None:
        if not isinstance(exponent, (int, float, Fraction)) or isinstance(exponent, bool):
            raise UnsafeExpressionError("** needs a numeric exponent")
        if abs(exponent) > 64:
            raise UnsafeExpressionError(f"exponent {exponent} too large (limit 64)")
        if isinstance(base, int) and base.bit_length() * abs(exponent) > MAX_INT_BITS:
            raise UnsafeExpressionError(f"{base}**{exponent} would exceed 2**{MAX_INT_BITS}")

    @staticmethod
    def _check_repeat(left: Any, right: Any) -> None:
        """Bound sequence repetition (``[..] * n``, ``'ab' * n``) before it allocates."""
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                limit = MAX_STRING_CHARS if isinstance(seq, str) else MAX_COLLECTION
                if len(seq) * n > limit:
                    raise UnsafeExpressionError(
                        f"repetition would make {len(seq) * n} elements (limit {limit})"
                    )

    @staticmethod
    def _check_value(value: Any) -> Any:
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise UnsafeExpressionError(f"number too large (over 2**{MAX_INT_BITS})")
        if isinstance(value, Fraction) and (
            value.numerator.bit_length() > MAX_INT_BITS
            or value.denominator.bit_length() > MAX_INT_BITS
        ):
            raise UnsafeExpressionError(f"fraction too large (over 2**{MAX_INT_BITS})")
        if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
            raise UnsafeExpressionError(
                f"string of {len(value)} characters (limit {MAX_STRING_CHARS})"
            )
        if isinstance(value, (list, tuple)):
            check_size(len(value), "collection")
        if isinstance(value, (int, float, str, Fraction, list, tuple, range, Labeled)):
            return value
        raise UnsafeExpressionError(f"values of type {type(value).__name__} are not allowed")

    def _call(self, node: ast.Call) -> Any:
        name = node.func.id if isinstance(node.func, ast.Name) else dotted_name(node.func)
        if name is None:
            self._eval(node.func)  # raises the precise refusal (lambda, attribute access, ...)
            raise UnsafeExpressionError("only named helper functions may be called")
        if name.split(".")[0].startswith("__") or "__" in name:
            raise UnsafeExpressionError(f"dunder names are not allowed ({name!r})")
        if name not in self.functions:
            raise UnsafeExpressionError(
                f"function {name!r} is not allowed; allowed: {', '.join(sorted(self.functions))}"
            )
        args = [self._eval(a) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise UnsafeExpressionError("**kwargs is not allowed")
            kwargs[kw.arg] = self._eval(kw.value)
        try:
            result = self.functions[name](*args, **kwargs)
        except UnsafeExpressionError:
            raise
        except (TypeError, ValueError, IndexError) as exc:
            raise UnsafeExpressionError(f"{name}(...) failed: {exc}") from None
        if isinstance(result, range):
            return result
        return self._check_value(result)


def safe_eval(source: str, variables: Mapping[str, Any] | None = None,
              rng: random.Random | None = None) -> Any:
    """Evaluate one template expression safely (convenience wrapper)."""
    functions = make_functions(rng or random.Random(0))
    return SafeEvaluator(variables or {}, functions).evaluate(source)
