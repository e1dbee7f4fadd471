"""What GSM-Symbolic template expressions work with: the helper functions they may call (pure
ones and ones drawing from a seeded RNG), the (text, number) pool values they draw, and the size
bounds those helpers enforce. The evaluator that calls them is ``safe_eval``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

MAX_COLLECTION = 100_000  # elements in any list/tuple/range that gets materialised


class UnsafeExpressionError(ValueError):
    """The expression uses something the evaluator refuses (or exceeds a bound)."""


@dataclass(frozen=True)
class Labeled:
    """A value drawn from a pool of (text, number) pairs, e.g. ("twice", 2) or ("half", 1/2).

    In arithmetic it is its number; rendered into a question it is its text.
    """

    text: str
    value: int | float | Fraction

    def __str__(self) -> str:
        return self.text


def unwrap(value: Any) -> Any:
    """The number behind a Labeled value (anything else unchanged)."""
    return value.value if isinstance(value, Labeled) else value


def labeled(value: Any) -> Any:
    """(text, number) pairs from pools become Labeled: text in questions, number in arithmetic."""
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and isinstance(value[1], (int, float, Fraction))
        and not isinstance(value[1], bool)
    ):
        return Labeled(str(value[0]), value[1])
    return value


# ---------------------------------------------------------------- helper functions of templates


def check_size(n: int, what: str) -> None:
    """Refuse a collection of n elements over MAX_COLLECTION (what: the operation, for the message)."""
    if n > MAX_COLLECTION:
        raise UnsafeExpressionError(f"{what} would hold {n} elements (limit {MAX_COLLECTION})")


def _range(*args: Any) -> range:
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        raise UnsafeExpressionError(f"range() takes integers, got {args!r}")
    r = range(*args)
    check_size(len(r), "range()")
    return r


def _frange(start: float, stop: float, step: float) -> list[float]:
    """Float range [start, stop) in steps, values rounded to 10 decimals (no drift)."""
    if step <= 0:
        raise UnsafeExpressionError(f"frange/arange step must be > 0, got {step}")
    n = math.ceil((stop - start) / step - 1e-12)
    check_size(max(n, 0), "frange()/arange()")
    return [round(start + i * step, 10) for i in range(max(n, 0))]


def _arange(start: float, stop: float | None = None, step: float = 1) -> list[float | int]:
    if stop is None:
        start, stop = 0, start
    values = _frange(start, stop, step)
    if all(isinstance(x, int) for x in (start, stop, step)):
        return [int(v) for v in values]
    return values


def _is_int(x: Any) -> bool:
    x = unwrap(x)
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True
    if isinstance(x, Fraction):
        return x.denominator == 1
    if isinstance(x, float):
        return math.isfinite(x) and abs(x - round(x)) < 1e-9 * max(1.0, abs(x))
    return False


def _divides(a: Any, b: Any) -> bool:
    """True when a is divisible by b (GSM-Symbolic's reading: divides(k*y, 12) means 12 | k*y)."""
    a, b = unwrap(a), unwrap(b)
    if b == 0:
        return False
    if isinstance(a, (int, Fraction)) and isinstance(b, (int, Fraction)):
        return (Fraction(a) / Fraction(b)).denominator == 1
    return _is_int(a / b)


def _fix_floats(values: Any) -> Any:
    """Round floats to 2 decimals (prices), element-wise for lists."""
    if isinstance(values, (list, tuple)):
        return [round(v, 2) if isinstance(v, float) else v for v in values]
    return round(values, 2) if isinstance(values, float) else values


def _numbers_within(lo: int, hi: int) -> list[int]:
    """Integers lo..hi inclusive."""
    return list(_range(lo, hi + 1))


def _make_rng_functions(rng: random.Random) -> dict[str, Callable[..., Any]]:
    def sample(population: Any, k: int | None = None) -> Any:
        pool = list(population)
        if not pool:
            raise UnsafeExpressionError("sample() from an empty collection")
        if k is None:
            return rng.choice(pool)
        if not isinstance(k, int) or not 0 < k <= len(pool):
            raise UnsafeExpressionError(f"sample(k={k!r}) from {len(pool)} items")
        return tuple(rng.sample(pool, k))

    def sample_sequential(population: Any, k: int) -> tuple:
        """k consecutive items of the population, in order (e.g. Monday, Tuesday, Wednesday)."""
        pool = list(population)
        if not isinstance(k, int) or not 0 < k <= len(pool):
            raise UnsafeExpressionError(f"sample_sequential(k={k!r}) from {len(pool)} items")
        start = rng.randrange(len(pool) - k + 1)
        return tuple(pool[start : start + k])

    def shuffle_list(values: Any) -> list:
        out = list(values)
        rng.shuffle(out)
        return out

    def randint(lo: int, hi: int, size: int | None = None) -> Any:
        """numpy-style: lo <= x < hi; with size, a list of draws."""
        if size is None:
            return rng.randrange(lo, hi)
        check_size(size, "randint(size)")
        return [rng.randrange(lo, hi) for _ in range(size)]

    return {
        "sample": sample,
        "sample_sequential": sample_sequential,
        "shuffle_list": shuffle_list,
        "randint": randint,
        "np.random.randint": randint,
        "random.randint": lambda lo, hi: rng.randint(lo, hi),
    }


def _format_frac(x: Any) -> str:
    """A mixed number as GSM8K writes it: Fraction(7, 2) -> '3 1/2', 3 -> '3'."""
    q = Fraction(unwrap(x)).limit_denominator(10_000)
    whole, rest = divmod(abs(q.numerator), q.denominator)
    sign = "-" if q < 0 else ""
    if rest == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole} {rest}/{q.denominator}" if whole else f"{sign}{rest}/{q.denominator}"


def _to_int(x: Any) -> int:
    x = unwrap(x)
    if isinstance(x, str):
        raise UnsafeExpressionError("int() of a string is not allowed")
    return int(x)


PURE_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "range": _range,
    "frange": _frange,
    "arange": _arange,
    "np.arange": _arange,
    "is_int": _is_int,
    "divides": _divides,
    "fix_floats": _fix_floats,
    "format_frac": _format_frac,
    "numbers_within": _numbers_within,
    "int": _to_int,
    "float": lambda x: float(unwrap(x)),
    "round": lambda x, n=None: round(unwrap(x), n),
    "abs": lambda x: abs(unwrap(x)),
    "min": min,
    "max": max,
    "sum": sum,
    "len": len,
    "list": lambda x=(): _bounded_list(x),
    "Fraction": lambda a, b=1: Fraction(unwrap(a)) / Fraction(unwrap(b)),
    "math.floor": math.floor,
    "math.ceil": math.ceil,
    "math.sqrt": math.sqrt,
}


def _bounded_list(x: Any) -> list:
    if isinstance(x, range):
        check_size(len(x), "list()")
    return list(x)


def make_functions(rng: random.Random) -> dict[str, Callable[..., Any]]:
    """The helper functions templates may call, with random ones bound to ``rng``."""
    return {**PURE_FUNCTIONS, **_make_rng_functions(rng)}

