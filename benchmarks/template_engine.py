"""Template engine: solving 'x == expr' conditions vs plain rejection sampling, side by side.

Runs both engines on the same templates (the GSM-Symbolic templates that have a solvable
equality when ../shared is present, else a built-in tight-equality template) and prints tries
per instance, wall time and templates completed, with the ratios.

    .venv/bin/python benchmarks/template_engine.py [--per-template 50]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cca_ray.data.templates import TemplateEngine, load_templates, parse_template

SHARED = Path(__file__).resolve().parents[2] / "shared/data/gsm-symbolic/templates/symbolic"
FALLBACK = {
    "id": "tight",
    "question_annotated": "{a,1} {b,2} {c,3}\n#init:\n- $a = range(1, 50)\n- $b = range(1, 50)\n"
                          "- $c = range(1, 500)\n#conditions:\n- c == a * b + 3\n#answer: c",
    "answer_annotated": "#### {c}",
}


def run(engine: TemplateEngine, templates, n: int) -> tuple[int, int, float]:
    start = time.perf_counter()
    tries = done = 0
    for t in templates:
        result = engine.instantiate(t, n)
        tries += result.tries
        done += result.ok
    return tries, done, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-template", type=int, default=50)
    args = parser.parse_args()
    if SHARED.is_dir():
        templates = [t for t in load_templates(SHARED) if t.solvable]
        source = f"{len(templates)} GSM-Symbolic templates with a solvable equality"
    else:
        templates = [parse_template(FALLBACK, "fallback")]
        source = "built-in tight-equality template"
    print(f"{source}, {args.per_template} instances each")
    solved = run(TemplateEngine(seed=0), templates, args.per_template)
    plain = run(TemplateEngine(seed=0, solve_equalities=False), templates, args.per_template)
    for name, (tries, done, secs) in (("solve equalities", solved), ("rejection only", plain)):
        print(f"  {name:17s} tries/instance {tries / (len(templates) * args.per_template):9.1f}"
              f"  wall {secs:7.2f} s  templates completed {done}/{len(templates)}")
    print(f"ratio (rejection / solve): tries {plain[0] / solved[0]:.1f}x, "
          f"wall {plain[2] / solved[2]:.1f}x")


if __name__ == "__main__":
    main()
