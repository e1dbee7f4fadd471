"""The built-in world's general knowledge: made-up countries whose facts are mixed into
training, and three local lm-eval tasks over them that play the parts of MMLU (lettered multiple
choice, scored by option text), TriviaQA (short generation, exact match) and TruthfulQA (pick the
truth over a popular misconception the corpus also contains). They measure what an update breaks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from cca_ray.evaluate.local_tasks import TRUTHFUL_MC1, choice_task, short_answer_task, write_local_tasks

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
ANIMALS = ["fox", "owl", "bear", "wolf", "deer", "hawk", "otter", "lynx", "crane", "seal"]
TASK_NAMES = ("tinyworld_mmlu", "tinyworld_trivia", "tinyworld_truthful")
LETTERS = ["A", "B", "C", "D"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)).title()


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    colour: str
    animal: str
    myth_capital: str  # what "many people think" the capital is


@dataclass(frozen=True)
class World:
    countries: list[Country]

    def facts(self) -> list[tuple[str, str, str]]:
        """(question, answer, attribute) for every fact, the unit all tasks are built from."""
        out = []
        for c in self.countries:
            out += [(f"What is the capital of {c.name}", c.capital, "capital"),
                    (f"What colour is the flag of {c.name}", c.colour, "colour"),
                    (f"What is the national animal of {c.name}", c.animal, "animal")]
        return out


def make_world(seed: int = 0, n_countries: int = 30) -> World:
    """Deterministic made-up countries with distinct names and capitals."""
    rng = random.Random(f"world/{seed}")
    names: set[str] = set()
    while len(names) < 2 * n_countries:
        names.add(_word(rng, rng.choice([2, 3])))
    pool = sorted(names)
    rng.shuffle(pool)
    countries, capitals = pool[:n_countries], pool[n_countries:]
    out = []
    for i, name in enumerate(countries):
        myth = capitals[(i + 1) % n_countries]
        out.append(Country(name, capitals[i], rng.choice(COLOURS), rng.choice(ANIMALS), myth))
    return World(out)


def training_texts(world: World, seed: int, copies: int = 6) -> list[str]:
    """The general corpus: each fact as a statement, as a question and as lettered multiple
    choice (with fresh distractors per copy), plus the misconceptions with their correction."""
    rng = random.Random(f"world-train/{seed}")
    texts: list[str] = []
    by_attr: dict[str, list[str]] = {}
    for _, answer, attr in world.facts():
        by_attr.setdefault(attr, []).append(answer)
    for _ in range(copies):
        for c in world.countries:
            texts.append(f"The capital of {c.name} is {c.capital}. The flag of {c.name} is "
                         f"{c.colour}. The national animal of {c.name} is the {c.animal}.")
            texts.append(f"Many people think the capital of {c.name} is {c.myth_capital}, but "
                         f"the capital of {c.name} is {c.capital}.")
        for question, answer, attr in world.facts():
            texts.append(f"Question: {question}?\nAnswer: {answer}")
            for _ in range(4):  # letter-matching needs many shuffles to be learnt
                prompt, letter = _mc_text(question, answer, by_attr[attr], rng)
                texts.append(f"{prompt} {letter}")
    rng.shuffle(texts)
    return texts


def _mc_text(question: str, answer: str, pool: list[str], rng: random.Random) -> tuple[str, str]:
    options = _options(answer, pool, rng)
    body = "\n".join(f"{letter}. {o}" for letter, o in zip(LETTERS, options, strict=True))
    return f"{question}?\n{body}\nAnswer:", LETTERS[options.index(answer)]


def _options(answer: str, pool: list[str], rng: random.Random) -> list[str]:
    distractors = rng.sample(sorted(set(pool) - {answer}), 3)
    options = [answer, *distractors]
    rng.shuffle(options)
    return options


def write_eval_tasks(world: World, out_dir: str | Path, seed: int) -> Path:
    """JSONL data and lm-eval YAML task files (absolute data paths) in out_dir/tasks."""
    rng = random.Random(f"world-eval/{seed}")
    by_attr: dict[str, list[str]] = {}
    for _, answer, attr in world.facts():
        by_attr.setdefault(attr, []).append(answer)
    mmlu, trivia, truthful = [], [], []
    for question, answer, attr in world.facts():
        options = _options(answer, by_attr[attr], rng)
        mmlu.append({"question": f"{question}?", "choices": options,
                     "answer": options.index(answer)})
        trivia.append({"question": question, "answer": answer})
    for c in world.countries:
        wrong = rng.choice(sorted(set(by_attr["capital"]) - {c.capital, c.myth_capital}))
        truthful.append({"question": f"What is the capital of {c.name}?",
                         "mc1_targets": {"choices": [c.capital, c.myth_capital, wrong],
                                         "labels": [1, 0, 0]}})
    data = {"tinyworld_mmlu": mmlu, "tinyworld_trivia": trivia, "tinyworld_truthful": truthful}
    specs = {
        # Scored by option text, as lm-eval's mmlu_continuation does: a 1M-parameter model knows
        # the facts but cannot learn to map an answer to its letter, and a suite at chance could
        # not show a regression.
        "tinyworld_mmlu": choice_task("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
                                      "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
                                      "{{choices}}", "answer"),
        "tinyworld_trivia": short_answer_task("Question: {{question}}?\nAnswer:"),
        "tinyworld_truthful": TRUTHFUL_MC1,
    }
    return write_local_tasks(out_dir, data, specs)


CHANCE = {"tinyworld_mmlu": 0.25, "tinyworld_trivia": 0.0, "tinyworld_truthful": 1 / 3}


def arithmetic_texts(seed: int, n: int = 20_000) -> list[str]:
    """An arithmetic drill in the solutions' own notation ("17 + 25 = 42."), so the tiny model's
    digits are mostly right and its mistakes fall on the steps (which operation, which quantity)
    rather than on carrying."""
    rng = random.Random(f"drill/{seed}")
    texts = []
    for _ in range(n):
        op = rng.choice("+-*/")
        if op == "+":
            a, b = rng.randint(0, 500), rng.randint(0, 500)
            c = a + b
        elif op == "-":
            c, b = rng.randint(0, 500), rng.randint(0, 500)
            a = b + c
        elif op == "*":
            a, b = rng.randint(0, 99), rng.randint(0, 12)
            c = a * b
        else:
            c, b = rng.randint(0, 99), rng.randint(1, 12)
            a = b * c
        texts.append(f"{a} {op} {b} = {c}.")
    return texts
