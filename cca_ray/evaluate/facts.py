"""Small local general-knowledge suites for real models offline: arithmetic-free facts in lm-eval's
MMLU (multiple choice), TriviaQA (short answer) and TruthfulQA-mc1 (misconception) formats.

The real suites (mmlu, triviaqa, truthfulqa_mc2) need the hub; these are what a laptop without
one can run, so a targeted update that damages general knowledge still shows up in the report.
"""

from __future__ import annotations

import random
from pathlib import Path

from cca_ray.evaluate.local_tasks import TRUTHFUL_MC1, choice_task, short_answer_task, write_local_tasks

# (country, capital, language)
COUNTRIES = [
    ("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Italy", "Rome", "Italian"),
    ("Spain", "Madrid", "Spanish"), ("Japan", "Tokyo", "Japanese"), ("China", "Beijing", "Chinese"),
    ("Russia", "Moscow", "Russian"), ("Egypt", "Cairo", "Arabic"), ("Greece", "Athens", "Greek"),
    ("Portugal", "Lisbon", "Portuguese"), ("Poland", "Warsaw", "Polish"), ("Sweden", "Stockholm", "Swedish"),
    ("Norway", "Oslo", "Norwegian"), ("Finland", "Helsinki", "Finnish"), ("Ireland", "Dublin", "English"),
    ("Austria", "Vienna", "German"), ("Hungary", "Budapest", "Hungarian"), ("Turkey", "Ankara", "Turkish"),
    ("Kenya", "Nairobi", "Swahili"), ("Peru", "Lima", "Spanish"), ("Thailand", "Bangkok", "Thai"),
    ("South Korea", "Seoul", "Korean"), ("Argentina", "Buenos Aires", "Spanish"),
    ("Mexico", "Mexico City", "Spanish"), ("Canada", "Ottawa", "English"),
    ("Brazil", "Brasilia", "Portuguese"), ("Australia", "Canberra", "English"),
    ("India", "New Delhi", "Hindi"), ("Denmark", "Copenhagen", "Danish"),
    ("Netherlands", "Amsterdam", "Dutch"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("up", "down"), ("open", "closed"), ("early", "late"), ("rich", "poor"), ("full", "empty"),
    ("strong", "weak"), ("young", "old"), ("wet", "dry"), ("loud", "quiet"), ("hard", "soft"),
    ("long", "short"), ("true", "false"), ("win", "lose"), ("begin", "end"), ("push", "pull"),
]
# (thing, kind) with the kinds as the choice pool
KINDS = [
    ("dog", "mammal"), ("cat", "mammal"), ("whale", "mammal"), ("horse", "mammal"), ("cow", "mammal"),
    ("eagle", "bird"), ("sparrow", "bird"), ("penguin", "bird"), ("owl", "bird"), ("parrot", "bird"),
    ("salmon", "fish"), ("shark", "fish"), ("tuna", "fish"), ("trout", "fish"),
    ("ant", "insect"), ("bee", "insect"), ("butterfly", "insect"), ("beetle", "insect"),
    ("snake", "reptile"), ("lizard", "reptile"), ("crocodile", "reptile"), ("turtle", "reptile"),
    ("frog", "amphibian"), ("toad", "amphibian"), ("salamander", "amphibian"),
]
COLOURS = [("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
           ("a ripe banana", "yellow"), ("a ripe tomato", "red"), ("an orange", "orange"),
           ("chocolate", "brown"), ("a lemon", "yellow"), ("blood", "red")]
# (question, true answer, common misconception)
MISCONCEPTIONS = [
    ("What is the largest ocean on Earth?", "The Pacific Ocean", "The Atlantic Ocean"),
    ("Which planet is closest to the Sun?", "Mercury", "Venus"),
    ("What do bees make?", "Honey", "Milk"),
    ("What gas do plants take in from the air to make food?", "Carbon dioxide", "Oxygen"),
    ("How many legs does a spider have?", "Eight", "Six"),
    ("Is a tomato a fruit or a vegetable, botanically?", "A fruit", "A vegetable"),
    ("Is a whale a fish?", "No, a whale is a mammal", "Yes, a whale is a fish"),
    ("Which is the largest planet in the solar system?", "Jupiter", "Saturn"),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees", "50 degrees"),
    ("Do bats see at all?", "Yes, bats can see", "No, bats are blind"),
    ("What is the chemical symbol for gold?", "Au", "Go"),
    ("Which animal is the tallest in the world?", "The giraffe", "The elephant"),
    ("What is the hardest natural substance?", "Diamond", "Iron"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", "Charles Dickens"),
    ("What is frozen water called?", "Ice", "Steam"),
    ("Which continent is Egypt in?", "Africa", "Asia"),
    ("How many continents are there?", "Seven", "Five"),
    ("What is the closest star to Earth?", "The Sun", "The Moon"),
    ("Do penguins live at the North Pole?", "No, they live in the southern hemisphere", "Yes, many do"),
    ("What organ pumps blood through the body?", "The heart", "The liver"),
]
TASKS = ("facts_mmlu", "facts_trivia", "facts_truthful")
CHANCE = {"facts_mmlu": 0.25, "facts_trivia": 0.0, "facts_truthful": 0.5}


def fact_rows(seed: int = 0) -> dict[str, list[dict]]:
    """The three suites' rows: MMLU-style (question, 4 choices, answer index), trivia (question,
    answer), TruthfulQA mc1 (true answer first, then the misconception)."""
    rng = random.Random(f"facts/{seed}")

    def options(answer: str, pool: list[str]) -> list[str]:
        wrong = rng.sample(sorted(set(pool) - {answer}), 3)
        out = wrong + [answer]
        rng.shuffle(out)
        return out

    capitals = [c[1] for c in COUNTRIES]
    languages = sorted({c[2] for c in COUNTRIES})
    words = [w for pair in OPPOSITES for w in pair]
    kinds = sorted({k for _, k in KINDS})
    colours = sorted({c for _, c in COLOURS})
    qa = ([(f"What is the capital of {c}?", cap, capitals) for c, cap, _ in COUNTRIES]
          + [(f"What language is mainly spoken in {c}?", lang, languages) for c, _, lang in COUNTRIES
             if c not in ("Canada", "India", "Kenya")]
          + [(f"What is the opposite of {a}?", b, words) for a, b in OPPOSITES]
          + [(f"What kind of animal is a {t}?", k, kinds) for t, k in KINDS]
          + [(f"What colour is {t}?", c, colours) for t, c in COLOURS])
    mmlu = []
    for q, a, pool in qa:
        choices = options(a, pool)
        mmlu.append({"question": q, "choices": choices, "answer": choices.index(a)})
    trivia = [{"question": q, "answer": a} for q, a, _ in qa]
    truthful = [{"question": q, "mc1_targets": {"choices": [t, f], "labels": [1, 0]}}
                for q, t, f in MISCONCEPTIONS]
    return {"facts_mmlu": mmlu, "facts_trivia": trivia, "facts_truthful": truthful}


def write_fact_tasks(out_dir: str | Path, seed: int = 0) -> Path:
    """JSONL data and lm-eval task YAMLs (absolute data paths) in out_dir/tasks."""
    question = "Question: {{question}}\nAnswer:"
    specs = {
        # scored by option text, as lm-eval's mmlu_continuation does
        "facts_mmlu": choice_task(question, "{{choices}}", "answer"),
        "facts_trivia": short_answer_task(question),
        "facts_truthful": TRUTHFUL_MC1,
    }
    return write_local_tasks(out_dir, fact_rows(seed), specs)
