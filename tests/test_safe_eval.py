"""The template expression evaluator: what it computes, and every hostile input it refuses."""

from __future__ import annotations

import random
import time
from fractions import Fraction

import pytest

from cca_ray.data.pools import POOLS
from cca_ray.data.safe_eval import safe_eval
from cca_ray.data.template_functions import Labeled, UnsafeExpressionError


@pytest.mark.parametrize(
    "source, variables, expected",
    [
        ("int((k * y) / (x * 12) * 100)", {"k": 2, "y": 6, "x": 10}, 10),
        ("y // d * t", {"y": 42, "d": 3, "t": 10}, 140),
        ("w4*n4 < w3*n3 < w2*n2 < w1 * n1", dict(w4=1, n4=1, w3=2, n3=1, w2=3, n2=1, w1=4, n1=1),
         True),
        ("0 <= k < n1", {"k": 3, "n1": 3}, False),
        ("divides(k*y, 12)", {"k": 2, "y": 6}, True),
        ("divides(x * 12, k*y)", {"x": 10, "k": 7, "y": 6}, False),
        ("is_int(n * frac)", {"n": 9, "frac": Fraction(1, 3)}, True),
        ("is_int(n * frac)", {"n": 10, "frac": Fraction(1, 3)}, False),
        ("(total * (100 - p) / 100) % 5 == 0", {"total": 50, "p": 50}, True),
        ("t + (k / Fraction(mult * m, t))", {"t": 40, "k": 1, "mult": 2, "m": 2}, 50),
        ("len(list(range(3, 19)) * 2)", {}, 32),
        ("fraction_nums[:4][0][1]", POOLS, Fraction(1, 2)),
        ("frac1[1] * 4", {"frac1": Labeled("half", Fraction(1, 2))}, 2),
        ("alphabets * 2", {"alphabets": Labeled("alphabet", 26)}, 52),
        ("np.arange(0.25, 1, 0.25)", {}, [0.25, 0.5, 0.75]),
        ("fix_floats([1.005, 2.0])", {}, [1.0, 2.0]),
        ("format_frac(Fraction(7, 2))", {}, "3 1/2"),
        ("round(2.567, 2)", {}, 2.57),
        ("d3[0]", {"d3": "Wednesday"}, "W"),
    ],
)
def test_allowed_expressions(source, variables, expected):
    assert safe_eval(source, variables) == expected


def test_random_helpers_are_seeded():
    draws = [safe_eval("sample(names, 3)", POOLS, random.Random(7)) for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) == 3
    days = safe_eval("sample_sequential(weekdays, 3)", POOLS, random.Random(1))
    i = POOLS["weekdays"].index(days[0])
    assert list(days) == POOLS["weekdays"][i : i + 3]
    many = safe_eval("np.random.randint(1000, 3000, 50)", {}, random.Random(0))
    assert len(many) == 50 and all(1000 <= x < 3000 for x in many)


HOSTILE = {
    "__import__('os')": "dunder",
    "__import__('os').system('true')": "dunder",
    "().__class__.__bases__": "dunder",
    "().__class__": "dunder",
    "(1).real": "attribute access",
    "np.linalg.inv(1)": "not allowed",
    "x.__dict__": "dunder",
    "open('/etc/passwd')": "not allowed",
    "eval('1+1')": "not allowed",
    "exec('import os')": "not allowed",
    "getattr(1, 'real')": "not allowed",
    "10**10**10": "too large",
    "2**4096": "too large",
    "9**9**9**9": "too large",
    "lambda: 1": "lambda",
    "(lambda x: x)(1)": "lambda",
    "[x for x in range(10**9)]": "comprehension",
    "[y for x in range(10) for y in range(10)]": "comprehension",
    "sum(x for x in range(10**12))": "generator",
    "'a' * 10**9": "repetition",
    "[0] * 10**9": "repetition",
    "list(range(10**9))": "elements",
    "'" + "a" * 5000 + "'": "characters",
    "'x' * 900 + 'y' * 900": "characters",
    "import os": "not a valid expression",
    "(x := 5)": "assignment",
    "f'{1}'": "f-strings",
    "{'a': 1}": "not allowed",
    "undefined_name + 1": "unknown name",
    "range": "must be called",
}


@pytest.mark.parametrize("source", list(HOSTILE))
def test_hostile_expressions_are_refused(source):
    start = time.perf_counter()
    with pytest.raises(UnsafeExpressionError) as info:
        safe_eval(source, {"x": 1})
    assert HOSTILE[source] in str(info.value)
    assert time.perf_counter() - start < 2.0  # refused quickly, never run to exhaustion


def test_a_very_long_expression_is_refused():
    with pytest.raises(UnsafeExpressionError, match="characters long"):
        safe_eval("1 + " * 1000 + "1")


def test_evaluation_steps_are_bounded():
    # Within size limits but a huge amount of work: refused by the step/time budget.
    with pytest.raises(UnsafeExpressionError, match="elements|steps|longer"):
        safe_eval("sum(list(range(10**5)) * 10**5)")
