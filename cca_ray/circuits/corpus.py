"""Synthetic Python-like corpus for the circuits model: short snippets (under ~45 BPE tokens) whose
idioms carry the four binary tasks (closing quote, `]]` vs `]`, set `.add(` vs string `+=`,
`while True:` vs `return True\\n`), each decision fully determined by its context.

Every idiom is a small render function of explicitly drawn parameters, so tasks.py can render the
two members of a minimal pair from the same draw and cut them at the decision point.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

WORDS = ("hello", "world", "foo", "bar", "spam", "eggs", "red", "blue", "cat", "dog", "one", "two",
         "yes", "no", "ok", "done", "key", "value", "time", "data")
NAMES = ("x", "y", "z", "a", "b", "out", "res", "buf", "acc", "val", "item", "seen", "text", "tmp",
         "name", "total")
ARGS = ("xs", "ws", "items", "vals", "nums", "parts")
FUNCS = ("f", "g", "h", "run", "check", "build", "find", "main", "step", "load", "has_key", "is_ok")
LOOP_VARS = ("i", "j", "w", "v", "c", "p")
QUOTES = ('"', "'")
IND = "    "
MAX_CHARS = 160


def phrase(rng: random.Random) -> str:
    """1-3 words from the word pool (the content of every string literal)."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))


def string_literal(rng: random.Random, quote: str | None = None) -> str:
    """A string literal whose closing quote matches its opening one (random kind unless given)."""
    q = quote or rng.choice(QUOTES)
    return f"{q}{phrase(rng)}{q}"


def list_literal(rng: random.Random, depth: int | None = None) -> str:
    """A flat (`[1, 2]`) or singly nested (`[[1, 2]]`) list of 1-5 digits."""
    depth = depth or rng.choice((1, 2))
    elems = ", ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 5)))
    return "[" * depth + elems + "]" * depth


def string_statement(rng: random.Random, quote: str | None = None) -> str:
    """`name = "..."` or `print("...")` (one line, no indentation)."""
    lit = string_literal(rng, quote)
    return f"{rng.choice(NAMES)} = {lit}" if rng.random() < 0.6 else f"print({lit})"


def list_statement(rng: random.Random, depth: int | None = None) -> str:
    """`name = [...]` or `print([...])` with a flat or doubly nested list."""
    lit = list_literal(rng, depth)
    return f"{rng.choice(NAMES)} = {lit}" if rng.random() < 0.7 else f"print({lit})"


def int_statement(rng: random.Random) -> str:
    """`name = 3` or `print(name)`."""
    name = rng.choice(NAMES)
    return f"{name} = {rng.randint(0, 9)}" if rng.random() < 0.6 else f"print({name})"


def simple_statement(rng: random.Random) -> str:
    """One random single-line statement (string, list or int)."""
    maker = rng.choice((string_statement, string_statement, list_statement, list_statement, int_statement))
    return maker(rng)


def for_list_block(rng: random.Random, depth: int | None = None) -> str:
    """`for v in [...]:` over a flat or nested list, with a one-line body."""
    v, lit = rng.choice(LOOP_VARS), list_literal(rng, depth)
    body = f"print({v})" if rng.random() < 0.5 else simple_statement(rng)
    return f"for {v} in {lit}:\n{IND}{body}\n"


@dataclass(frozen=True)
class Accumulator:
    """Parameters of a set / string accumulator block (shared by both members of a minimal pair)."""

    name: str
    var: str
    source: str  # the iterable: a function argument or a list literal
    fn: str | None  # wrap in `def fn(source):` when set
    quote: str  # quote of the empty string `""` / `''`
    between: str | None  # an unrelated statement between the initialisation and the loop
    item_literal: bool  # add a literal instead of the loop variable


def draw_accumulator(rng: random.Random) -> Accumulator:
    """Random parameters of an accumulator block."""
    name, var = rng.choice(NAMES), rng.choice(LOOP_VARS)
    in_def = rng.random() < 0.6
    source = rng.choice(ARGS) if in_def else list_literal(rng, 1)
    between = None
    if rng.random() < 0.3:  # never one that reassigns (or mentions) the accumulator
        between = simple_statement(rng)
        while name in re.findall(r"\w+", between):
            between = simple_statement(rng)
    return Accumulator(name, var, source, rng.choice(FUNCS) if in_def else None, rng.choice(QUOTES), between,
                       rng.random() < 0.4)


def render_accumulator(p: Accumulator, kind: str, rng: random.Random) -> str:
    """The block for kind "set" (`x = set()` ... `x.add(v)`) or "string" (`x = ""` ... `x += v`);
    `rng` only draws the literal that is added (after the task's decision point)."""
    ind = IND if p.fn else ""
    lines = [f"def {p.fn}({p.source}):"] if p.fn else []
    lines.append(f"{ind}{p.name} = {'set()' if kind == 'set' else p.quote * 2}")
    if p.between:
        lines.append(ind + p.between)
    lines.append(f"{ind}for {p.var} in {p.source}:")
    if kind == "set":
        lines.append(f"{ind}{IND}{p.name}.add({rng.randint(0, 9) if p.item_literal else p.var})")
    else:
        lines.append(f"{ind}{IND}{p.name} += {string_literal(rng) if p.item_literal else p.var}")
    lines.append(f"{IND}return {p.name}" if p.fn else f"print({p.name})")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class BoolFunc:
    """Parameters of a small function ending in `return True` or containing `while True:`."""

    fn: str
    arg: str
    pre: str | None  # a statement at the top of the body
    loop_var: str | None  # wrap the decision in `for loop_var in arg:`
    cond: str | None  # and/or in `if cond:`
    body: str  # the body of the while loop


def draw_bool_func(rng: random.Random) -> BoolFunc:
    """Random parameters of a while / return-True function."""
    arg = rng.choice(ARGS + ("n", "k"))
    loop_var = rng.choice(LOOP_VARS) if rng.random() < 0.4 else None
    subject = loop_var or arg
    cond = None
    if rng.random() < 0.6:
        cond = f"{subject} {rng.choice(('==', '>', '<', '!='))} {rng.randint(0, 9)}"
    pre = simple_statement(rng) if rng.random() < 0.4 else None
    body = rng.choice((f"print({subject})", "break", string_statement(rng), f"{subject} = {subject} + 1"))
    return BoolFunc(rng.choice(FUNCS), arg, pre, loop_var, cond, body)


def render_bool_func(p: BoolFunc, kind: str) -> str:
    """The function with `return True` (kind "return") or a `while True:` loop (kind "while")."""
    lines, ind = [f"def {p.fn}({p.arg}):"], IND
    if p.pre:
        lines.append(ind + p.pre)
    if p.loop_var:
        lines.append(f"{ind}for {p.loop_var} in {p.arg}:")
        ind += IND
    if p.cond:
        lines.append(f"{ind}if {p.cond}:")
        ind += IND
    if kind == "return":
        lines.append(f"{ind}return True")
        if ind != IND:
            lines.append(f"{IND}return False")
    else:
        lines += [f"{ind}while True:", f"{ind}{IND}{p.body}"]
    return "\n".join(lines) + "\n"


def _statements_doc(rng: random.Random) -> str:
    parts = [simple_statement(rng) + "\n" for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.35:
        parts.insert(rng.randint(0, len(parts)), for_list_block(rng))
    return "".join(parts)


def _accumulator_doc(rng: random.Random) -> str:
    return render_accumulator(draw_accumulator(rng), rng.choice(("set", "string")), rng)


def _bool_doc(rng: random.Random) -> str:
    return render_bool_func(draw_bool_func(rng), rng.choice(("while", "return")))


def generate_doc(rng: random.Random) -> str:
    """One document (ends with a newline, at most MAX_CHARS characters): statements, an accumulator
    block or a while / return-True function."""
    while True:
        doc = rng.choices((_statements_doc, _accumulator_doc, _bool_doc), weights=(4, 3, 3))[0](rng)
        if len(doc) <= MAX_CHARS:
            return doc


def generate_corpus(num_docs: int, seed: int) -> list[str]:
    """`num_docs` documents, deterministic given `seed`."""
    rng = random.Random(seed)
    return [generate_doc(rng) for _ in range(num_docs)]
