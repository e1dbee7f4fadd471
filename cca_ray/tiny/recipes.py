"""The built-in world's math templates, written as recipes of steps (`python -m
cca_ray.tiny.recipes` rewrites cca_ray/tiny/templates/*.json from them; a test checks they agree).

Why this shape (world v2): CCA amplifies a right continuation that the model holds but that a
competitor out-votes at a decision token. Each step of a story is one operation named by a cue
phrase in the question; its chain-of-thought line writes the operation as one token ("+", "-",
"*"). Three cue phrases are *tricky*: in the model's training stories their step is right in most
stories but the competitor operation is written in a minority, and that minority concentrates on a
few items (coins, cards, stamps) that say nothing about the operation. Greedy decoding then takes
the competitor for those items, sampling shows both, and the same three decisions recur across
templates, so a fix learnt on some templates can transfer to others. Operands stay small so that
the step arithmetic itself is almost always right.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from cca_ray.data.template_parsing import write_template_folder

ITEMS = ["apples", "pears", "eggs", "shells", "marbles", "coins", "cards", "stamps"]
BIASED_ITEMS = ("coins", "cards", "stamps")  # the competitor's minority concentrates on these


@dataclass(frozen=True)
class Step:
    """One question sentence and its chain-of-thought line: state <op> operand."""

    kind: str
    question: str  # {n}: the name, {v}: the operand, {item}
    cot: str  # the cue restated before ", so {n} has"
    op: str
    competitor: str | None = None  # the tricky steps' competing operation

    @property
    def tricky(self) -> bool:
        return self.competitor is not None


STEPS = {s.kind: s for s in [
    Step("buys", "{n} buys {v} more {item}.", "{n} buys {v} more", "+"),
    Step("finds", "{n} finds {v} more {item}.", "{n} finds {v} more", "+"),
    Step("loses", "{n} loses {v} {item}.", "{n} loses {v}", "-"),
    Step("uses", "{n} uses {v} {item}.", "{n} uses {v}", "-"),
    Step("given", "{n} is given {v} {item}.", "{n} is given {v}", "+", competitor="-"),
    Step("sells", "{n} sells {v} {item}.", "{n} sells {v}", "-", competitor="+"),
]}
# How a story starts: a plain count, or a product (packs are tricky: "k packs of x" -> k + x).
STARTS = {
    "has": ("{n} has {a} {item}.", None),
    "collects": ("{n} collects {a} {item}.", None),
    "boxes": ("{n} has {k} boxes with {x} {item} in each box.", ("{n} has {k} boxes of {x}", "*", None)),
    "packs": ("{n} buys {k} packs of {x} {item}.", ("{n} buys {k} packs of {x}", "*", "+")),
}
QUESTIONS = {"now": "How many {item} does {n} have now?", "left": "How many {item} are there in the end?"}

# (id, held_out, start, steps, question)
RECIPES: list[tuple[str, bool, str, tuple[str, ...], str]] = [
    ("w01", False, "has", ("given",), "now"),
    ("w02", False, "has", ("sells",), "now"),
    ("w03", False, "packs", (), "now"),
    ("w04", False, "has", ("given", "loses"), "now"),
    ("w05", False, "has", ("sells", "buys"), "now"),
    ("w06", False, "has", ("buys", "sells"), "now"),
    ("w07", False, "has", ("finds", "given"), "now"),
    ("w08", False, "packs", ("loses",), "now"),
    ("w09", False, "packs", ("given",), "now"),
    ("w10", False, "boxes", ("sells",), "now"),
    ("w11", False, "has", ("given", "sells"), "now"),
    ("w12", False, "has", ("uses", "given"), "now"),
    ("w13", False, "packs", ("buys",), "now"),
    ("w14", False, "has", ("sells", "uses"), "now"),
    ("w15", False, "has", ("loses", "sells"), "now"),
    ("w16", False, "boxes", ("given",), "now"),
    ("w17", False, "packs", ("sells",), "now"),
    ("w18", False, "has", ("given", "finds"), "now"),
    ("w19", False, "has", ("buys",), "now"),
    ("w20", False, "has", ("loses",), "now"),
    ("w21", False, "boxes", (), "now"),
    ("w22", False, "has", ("finds", "uses"), "now"),
    ("w23", False, "boxes", ("loses",), "now"),
    ("w24", False, "has", ("uses", "buys"), "now"),
    ("w25", False, "boxes", ("buys",), "now"),
    ("w26", False, "has", ("loses", "finds"), "now"),
    ("w27", False, "has", ("buys", "uses"), "now"),
    ("w28", False, "has", ("finds",), "now"),
    # held out of training: new story starts and questions over the same three decisions
    ("h01", True, "collects", ("given", "uses"), "left"),
    ("h02", True, "collects", ("sells", "finds"), "left"),
    ("h03", True, "packs", ("loses", "given"), "left"),
    ("h04", True, "collects", ("buys", "sells"), "left"),
]

OPERAND = "range(2, 10)"
START_COUNT = "range(20, 36)"


def _apply(state: str, op: str, operand: str) -> str:
    return f"({state} {op} {operand})"


def _solution(start: str, steps: tuple[str, ...], ops: list[str]) -> tuple[str, str, list[str]]:
    """(answer_annotated, final expression, every intermediate expression) for one choice of
    operations (ops: one per decision, the start's first if it is a product)."""
    lines, states = [], []
    ops = list(ops)
    if STARTS[start][1] is None:
        state = "a"
    else:
        cue, _, _ = STARTS[start][1]
        op = ops.pop(0)
        state = f"(k {op} x)"
        lines.append(f"{cue.format(n='{name}', k='{k}', x='{x}')}, so {{name}} has {{k}} {op} {{x}} = "
                     f"<<{{k}}{op}{{x}}={{{state}}}>>{{{state}}} {{item}}.")
        states.append(state)
    for i, kind in enumerate(steps):
        step, var = STEPS[kind], f"v{i + 1}"
        op = ops.pop(0)
        new = _apply(state, op, var)
        lines.append(f"{step.cot.format(n='{name}', v='{' + var + '}')}, so {{name}} has {{{state}}} {op} "
                     f"{{{var}}} = <<{{{state}}}{op}{{{var}}}={{{new}}}>>{{{new}}} {{item}}.")
        state = new
        states.append(state)
    return "\n".join(lines) + f"\n#### {{{state}}}", state, states


def _decisions(start: str, steps: tuple[str, ...]) -> list[tuple[str, str, str | None]]:
    """(kind, right op, competitor op or None) for each decision of the story, in order."""
    out = []
    if STARTS[start][1] is not None:
        out.append((start, STARTS[start][1][1], STARTS[start][1][2]))
    out += [(k, STEPS[k].op, STEPS[k].competitor) for k in steps]
    return out


def template(recipe: tuple[str, bool, str, tuple[str, ...], str]) -> dict:
    """The template record (GSM-Symbolic JSON layout) plus the competitors' solutions."""
    tid, held_out, start, steps, question = recipe
    decisions = _decisions(start, steps)
    words = [STARTS[start][0].format(n="{name,Ana}", a="{a,24}", k="{k,3}", x="{x,6}", item="{item,apples}")]
    for i, kind in enumerate(steps):
        words.append(STEPS[kind].question.format(n="{name,Ana}", v=f"{{v{i + 1},{3 + i}}}",
                                                 item="{item,apples}"))
    words.append(QUESTIONS[question].format(n="{name,Ana}", item="{item,apples}"))
    init = ["name = sample(names)", f"item = sample({json.dumps(ITEMS)})"]
    if STARTS[start][1] is None:
        init.append(f"$a = {START_COUNT}")
    else:
        init += ["$k = range(2, 7)", "$x = range(3, 10)"]
    init += [f"$v{i + 1} = {OPERAND}" for i in range(len(steps))]
    right = [op for _, op, _ in decisions]
    answer, final, _ = _solution(start, steps, right)
    # every variant the training stories may write keeps each count at 1 or more
    conditions: set[str] = set()
    competitors = []
    tricky = [i for i, (_, _, comp) in enumerate(decisions) if comp]
    for r in range(len(tricky) + 1):
        for flips in itertools.combinations(tricky, r):
            ops = [comp if i in flips else op for i, (_, op, comp) in enumerate(decisions)]
            text, expr, states = _solution(start, steps, ops)
            conditions |= {f"{s} >= 1" for s in states}
            if flips:
                competitors.append({"flips": list(flips), "answer_annotated": text, "answer": expr})
    body = " ".join(words)
    body += "\n\n#init:\n" + "\n".join(f"- {line}" for line in init)
    body += "\n\n#conditions:\n" + "\n".join(f"- {c}" for c in sorted(conditions))
    body += f"\n\n#answer: {final}"
    return {
        "id": tid, "held_out": held_out, "question_annotated": body, "answer_annotated": answer,
        "decisions": [{"kind": k, "op": op, "competitor": comp} for k, op, comp in decisions],
        "competitors": competitors,
    }


def write_templates(out_dir: Path) -> list[Path]:
    """Write one JSON file per recipe (the committed files are exactly this output)."""
    return write_template_folder((template(recipe) for recipe in RECIPES), out_dir)


if __name__ == "__main__":
    from cca_ray.tiny import TEMPLATES_DIR

    for old in TEMPLATES_DIR.glob("*.json"):
        old.unlink()
    print(f"wrote {len(write_templates(TEMPLATES_DIR))} templates to {TEMPLATES_DIR}")
