"""Everyday one- and two-step arithmetic stories with small operands, as GSM-Symbolic templates.

The built-in world's stories (operands up to 35, up to three steps, its own cue words) are what
its tiny model was trained on; a small real pretrained model solves few of them. These are the
kind of problem such a model partly solves (GSM8K style, numbers 2-12), so CCA has wrong greedy
traces with right sampled ones to learn from. ``python -m cca_ray.data.basic_templates``
rewrites the JSON files in cca_ray/data/basic/ (a test checks they match).
"""

from __future__ import annotations

from pathlib import Path

from cca_ray.data.template_parsing import write_template_folder

BASIC_DIR = Path(__file__).parent / "basic"
ITEMS = '["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards"]'

# (id, question, init lines, conditions, answer expression, worked solution with {expr} slots)
# Question slots are {var,default}; the solution's <<a+b=c>> calculator marks follow GSM8K.
STORIES: list[tuple[str, str, list[str], list[str], str, str]] = [
    ("b01", "{name,Ana} has {a,5} {item,apples}. {name,Ana} buys {b,3} more {item,apples}. "
            "How many {item,apples} does {name,Ana} have now?",
     ["$a = range(2, 13)", "$b = range(2, 13)"], [], "a + b",
     "{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item} now."),
    ("b02", "{name,Ana} has {a,9} {item,apples}. {name,Ana} gives {b,4} {item,apples} to a friend. "
            "How many {item,apples} does {name,Ana} have left?",
     ["$a = range(5, 21)", "$b = range(2, 10)"], ["a - b >= 1"], "a - b",
     "{name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {item} left."),
    ("b03", "{name,Ana} has {a,3} bags. Each bag holds {b,4} {item,apples}. "
            "How many {item,apples} does {name,Ana} have?",
     ["$a = range(2, 10)", "$b = range(2, 10)"], [], "a * b",
     "{name} has {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {item}."),
    ("b04", "{name,Ana} shares {a,12} {item,apples} equally among {b,3} friends. "
            "How many {item,apples} does each friend get?",
     ["$a = range(4, 61)", "$b = range(2, 7)"], ["a % b == 0", "a // b >= 2"], "a // b",
     "Each friend gets {a} / {b} = <<{a}/{b}={a // b}>>{a // b} {item}."),
    ("b05", "{name,Ana} read {a,6} pages on Monday and {b,7} pages on Tuesday. "
            "How many pages did {name,Ana} read in total?",
     ["$a = range(2, 20)", "$b = range(2, 20)"], [], "a + b",
     "{name} read {a} + {b} = <<{a}+{b}={a + b}>>{a + b} pages."),
    ("b06", "There are {a,10} {item,apples} on a table. {name,Ana} takes {b,3} of them. "
            "How many {item,apples} are left on the table?",
     ["$a = range(6, 25)", "$b = range(2, 6)"], ["a - b >= 1"], "a - b",
     "There are {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {item} left."),
    ("b07", "A room has {a,4} rows of chairs with {b,6} chairs in each row. How many chairs are there?",
     ["$a = range(2, 10)", "$b = range(2, 10)"], [], "a * b",
     "There are {a} * {b} = <<{a}*{b}={a * b}>>{a * b} chairs."),
    ("b08", "A pen costs {a,3} dollars. {name,Ana} buys {b,5} pens. How many dollars does {name,Ana} pay?",
     ["$a = range(2, 10)", "$b = range(2, 10)"], [], "a * b",
     "{name} pays {a} * {b} = <<{a}*{b}={a * b}>>{a * b} dollars."),
    ("b09", "{name,Ana} has {a,6} {item,apples}. {name,Ana} buys {b,4} more and then gives {c,3} away. "
            "How many {item,apples} does {name,Ana} have now?",
     ["$a = range(2, 13)", "$b = range(2, 13)", "$c = range(2, 8)"], ["a + b - c >= 1"], "a + b - c",
     "After buying, {name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}. After giving {c} away, "
     "{name} has {a + b} - {c} = <<{a + b}-{c}={a + b - c}>>{a + b - c} {item}."),
    ("b10", "{name,Ana} has {a,5} {item,apples}. {name,Ana} buys {b,2} packs with {c,4} {item,apples} "
            "in each pack. How many {item,apples} does {name,Ana} have now?",
     ["$a = range(2, 13)", "$b = range(2, 6)", "$c = range(2, 7)"], [], "a + b * c",
     "The packs hold {b} * {c} = <<{b}*{c}={b * c}>>{b * c} {item}. {name} has {a} + {b * c} = "
     "<<{a}+{b * c}={a + b * c}>>{a + b * c} {item} now."),
    ("b11", "{name,Ana} has {a,3} boxes with {b,5} {item,apples} in each box. {name,Ana} loses {c,2} "
            "{item,apples}. How many {item,apples} does {name,Ana} have left?",
     ["$a = range(2, 7)", "$b = range(2, 9)", "$c = range(1, 6)"], ["a * b - c >= 1"], "a * b - c",
     "The boxes hold {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {item}. {name} has {a * b} - {c} = "
     "<<{a * b}-{c}={a * b - c}>>{a * b - c} {item} left."),
    ("b12", "{name,Ana} earns {a,4} dollars an hour and works for {b,3} hours. Then {name,Ana} spends "
            "{c,5} dollars. How many dollars does {name,Ana} have left?",
     ["$a = range(2, 10)", "$b = range(2, 8)", "$c = range(1, 10)"], ["a * b - c >= 1"], "a * b - c",
     "{name} earns {a} * {b} = <<{a}*{b}={a * b}>>{a * b} dollars and has {a * b} - {c} = "
     "<<{a * b}-{c}={a * b - c}>>{a * b - c} dollars left."),
    ("b13", "A garden has {a,4} red flowers, {b,6} yellow flowers and {c,3} white flowers. "
            "How many flowers are in the garden?",
     ["$a = range(2, 13)", "$b = range(2, 13)", "$c = range(2, 13)"], [], "a + b + c",
     "There are {a} + {b} = <<{a}+{b}={a + b}>>{a + b} red and yellow flowers, and {a + b} + {c} = "
     "<<{a + b}+{c}={a + b + c}>>{a + b + c} flowers in all."),
    ("b14", "{name,Ana} has {a,10} {item,apples}. {name,Ana} loses {b,4} and then finds {c,3}. "
            "How many {item,apples} does {name,Ana} have now?",
     ["$a = range(6, 16)", "$b = range(2, 6)", "$c = range(2, 9)"], ["a - b >= 1"], "a - b + c",
     "After losing {b}, {name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {item}. After finding {c}, "
     "{name} has {a - b} + {c} = <<{a - b}+{c}={a - b + c}>>{a - b + c} {item}."),
    ("b15", "{a,4} friends each bring {b,3} {item,apples} to a party, and the host adds {c,5} more. "
            "How many {item,apples} are at the party?",
     ["$a = range(2, 7)", "$b = range(2, 7)", "$c = range(2, 11)"], [], "a * b + c",
     "The friends bring {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {item}. With the host's {c}, there are "
     "{a * b} + {c} = <<{a * b}+{c}={a * b + c}>>{a * b + c} {item}."),
    ("b16", "{name,Ana} has {a,4} {item,apples} and {name2,Ben} has {b,3} more than {name,Ana}. "
            "How many {item,apples} do they have together?",
     ["$a = range(2, 13)", "$b = range(2, 9)"], ["name != name2"], "a + (a + b)",
     "{name2} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}. Together they have {a} + {a + b} = "
     "<<{a}+{a + b}={a + (a + b)}>>{a + (a + b)} {item}."),
]


def template_folder(path: str) -> Path:
    """data.path -> templates folder or file: 'builtin' (the tiny world), 'basic' (these), or a path."""
    from cca_ray.config import BUILTIN
    from cca_ray.tiny import TEMPLATES_DIR

    return {BUILTIN: TEMPLATES_DIR, "basic": BASIC_DIR}.get(path, Path(path))


def template_json(story: tuple[str, str, list[str], list[str], str, str]) -> dict:
    """One story as a GSM-Symbolic template (question_annotated / answer_annotated)."""
    tid, question, init, conditions, answer, solution = story
    names = ["name = sample(names)"] + (["name2 = sample(names)"] if "name2" in question else [])
    items = [f"item = sample({ITEMS})"] if "{item" in question else []
    lines = [question, "", "#init:"] + [f"- {x}" for x in names + items + init]
    if conditions:
        lines += ["", "#conditions:"] + [f"- {c}" for c in conditions]
    lines += ["", f"#answer: {answer}"]
    return {"id": tid, "question_annotated": "\n".join(lines),
            "answer_annotated": f"{solution}\n#### {{{answer}}}"}


def write_templates(out: Path = BASIC_DIR) -> list[Path]:
    """(Re)write one JSON file per story into out."""
    return write_template_folder((template_json(story) for story in STORIES), out)


if __name__ == "__main__":
    for p in write_templates():
        print(p)
