"""Answer extraction and scoring exactly as the method doc states, plus macro accuracy.

Extraction: cut the completion at the end of the first ``answer is ...`` sentence, delete
commas, take the last number (``-?\\d+\\.?\\d*``) as a float. The gold number is the one after
``####``. Correct means float equality. A completion with no number is wrong, never an error.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Hashable, Iterable

# "answer is" up to the sentence's end. A period followed by a digit is a decimal point, not the
# end of the sentence ("The final answer is 3.5." must give 3.5, not 3).
ANSWER_SENTENCE = re.compile(r"answer is(?:[^.\n]|\.(?=\d))*\.?")
# Where generation stops: a *complete* answer sentence (the period is required).
STOP_SENTENCE = re.compile(r"answer is(?:[^.\n]|\.(?=\d))*\.(?!\d)")
NUMBER = re.compile(r"-?\d+\.?\d*")


def extract_answer(completion: str) -> float | None:
    """The model's numeric answer, or None when the completion holds no number."""
    match = ANSWER_SENTENCE.search(completion)
    text = completion[: match.end()] if match else completion
    numbers = NUMBER.findall(text.replace(",", ""))
    if not numbers:
        return None
    try:
        return float(numbers[-1])
    except ValueError:
        return None


def parse_gold(answer: str) -> float:
    """The gold number after the last '####' of a GSM8K-style answer; ValueError if absent."""
    if "####" not in answer:
        raise ValueError("answer has no '#### N' line")
    tail = answer.rsplit("####", 1)[1].strip().replace(",", "")
    match = NUMBER.search(tail)
    if not match or match.start() > 1:  # allow one leading symbol such as '$'
        raise ValueError(f"no number after '####' (got {tail[:40]!r})")
    return float(match.group())


def is_correct(completion: str, gold: float) -> bool:
    """Float equality of the extracted answer with the gold number (None is wrong)."""
    predicted = extract_answer(completion)
    return predicted is not None and predicted == gold


def truncate_at_answer(text: str) -> str:
    """Cut a generated trace after its first complete answer sentence (the stop rule)."""
    match = STOP_SENTENCE.search(text)
    return text[: match.end()] if match else text


def per_template_accuracy(results: Iterable[tuple[Hashable, bool]]) -> dict[Hashable, float]:
    """Accuracy of each template from (template_id, correct) pairs."""
    hits: dict[Hashable, list[int]] = defaultdict(lambda: [0, 0])
    for template_id, correct in results:
        hits[template_id][0] += int(bool(correct))
        hits[template_id][1] += 1
    return {t: c / n for t, (c, n) in hits.items()}


def macro_accuracy(results: Iterable[tuple[Hashable, bool]]) -> float:
    """Mean over templates of per-template accuracy (the paper's metric)."""
    per_template = per_template_accuracy(results)
    if not per_template:
        raise ValueError("macro_accuracy of no results")
    return sum(per_template.values()) / len(per_template)
