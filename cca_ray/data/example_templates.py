"""Example templates for tests and benchmarks (records in the GSM-Symbolic JSON layout), kept in
the package so that a benchmark never has to import from tests/."""

from __future__ import annotations

# t must be a multiple of both coefficients' denominators, i.e. of their lcm: about 1 draw in 150
# meets the conditions, so plain rejection runs out of tries where construction does not.
TIGHT_DIVISIBILITY = {
    "id": "tight-divisibility",
    "question_annotated": (
        "{name,Ann} has {t,504} stamps and gives {frac1,1/7} of them to Bo and {frac2,1/8} of "
        "them to Cy. How many stamps are given away?\n\n#init:\n- name = sample(names)\n"
        "- $t = range(1, 2000)\n"
        "- $frac1 = [Fraction(1, 7), Fraction(2, 9), Fraction(3, 11), Fraction(5, 13), "
        "Fraction(4, 17)]\n"
        "- $frac2 = [Fraction(1, 8), Fraction(3, 10), Fraction(2, 15), Fraction(5, 19), "
        "Fraction(6, 23)]\n\n#conditions:\n- is_int(frac1 * t)\n- is_int(frac2 * t)\n\n"
        "#answer: frac1 * t + frac2 * t"
    ),
    "answer_annotated": (
        "Bo gets {frac1} * {t} = <<{frac1}*{t}={frac1*t}>>{frac1*t} stamps and Cy gets {frac2} * "
        "{t} = <<{frac2}*{t}={frac2*t}>>{frac2*t} stamps, {frac1*t + frac2*t} in all.\n"
        "#### {frac1*t + frac2*t}"
    ),
}
