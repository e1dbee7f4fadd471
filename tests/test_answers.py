"""Answer extraction and scoring against hand-checked cases."""

from __future__ import annotations

import pytest

from cca_ray.data.answers import (
    extract_answer,
    is_correct,
    macro_accuracy,
    parse_gold,
    per_template_accuracy,
    truncate_at_answer,
)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("So 3 + 4 = 7. The final answer is 1,234.", 1234.0),
        ("The final answer is 3.5.", 3.5),
        ("The final answer is -12.", -12.0),
        ("She pays $1,000 in total. The final answer is $1,000.", 1000.0),
        ("The final answer is 18. Q: next question has 99", 18.0),
        ("First 5, then 6. The answer is 11. Then 12 and 13.", 11.0),
        ("2 + 2 = 4 and then 4 * 3 = 12", 12.0),  # no 'answer is': last number of the text
        ("The final answer is 7", 7.0),
        ("I do not know.", None),
        ("", None),
        ("The final answer is unknown.", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_no_number_scores_wrong_never_crashes():
    assert is_correct("I cannot tell.", 5.0) is False
    assert is_correct("The final answer is 5.", 5.0) is True
    assert is_correct("The final answer is 5.0.", 5.0) is True
    assert is_correct("The final answer is 6.", 5.0) is False


@pytest.mark.parametrize(
    "answer, gold",
    [("So 5.\n#### 5", 5.0), ("x\n#### 1,234", 1234.0), ("#### -3", -3.0), ("#### $12", 12.0),
     ("#### 2.5", 2.5)],
)
def test_parse_gold(answer, gold):
    assert parse_gold(answer) == gold


@pytest.mark.parametrize("answer", ["no hash marks 5", "#### none"])
def test_parse_gold_rejects_answers_without_a_final_number(answer):
    with pytest.raises(ValueError):
        parse_gold(answer)


def test_stop_rule_cuts_after_the_first_complete_answer_sentence():
    text = "6 + 2 = 8. The final answer is 8.5. Q: another question"
    assert truncate_at_answer(text) == "6 + 2 = 8. The final answer is 8.5."
    assert truncate_at_answer("The final answer is 1") == "The final answer is 1"


def test_macro_accuracy_averages_templates_not_problems():
    results = [("a", True)] * 9 + [("a", False)] + [("b", False)]  # a: 0.9, b: 0.0
    assert per_template_accuracy(results) == {"a": 0.9, "b": 0.0}
    assert macro_accuracy(results) == pytest.approx(0.45)
    with pytest.raises(ValueError):
        macro_accuracy([])
