"""Template engine: sampling by construction vs plain rejection, side by side.

Instantiates the 100 GSM-Symbolic templates of ../shared (50 instances each by default) once
with the default sampler (rejection, with construction taking over when few draws meet the
conditions: cca_ray/data/construction_plan.py) and once with rejection only, under the same try
budget, and prints for each: templates that reached the requested count, total tries, wall
seconds and instances per second, then the ratios, overall and on the templates where
construction took over. Without ../shared it says so and runs one built-in tight-divisibility
template instead.

    .venv/bin/python benchmarks/template_engine.py [--per-template 50] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cca_ray.data.example_templates import TIGHT_DIVISIBILITY
from cca_ray.data.template_parsing import Template, load_templates, parse_template
from cca_ray.data.templates import InstantiationResult, TemplateEngine

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "gsm-symbolic" / "templates" / "symbolic"


@dataclass
class Run:
    """One sampler over all templates: per-template results and the totals."""

    name: str
    results: list[InstantiationResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tries(self) -> int:
        return sum(r.tries for r in self.results)

    @property
    def instances(self) -> int:
        return sum(len(r.instances) for r in self.results)

    def complete(self, n: int) -> int:
        return sum(len(r.instances) == n for r in self.results)


def run(name: str, engine: TemplateEngine, templates: list[Template], n: int) -> Run:
    """Instantiate every template with one engine, timing the whole pass."""
    out = Run(name)
    start = time.perf_counter()
    for t in templates:
        out.results.append(engine.instantiate(t, n))
    out.seconds = time.perf_counter() - start
    return out


def table(runs: list[Run], n: int, count: int) -> None:
    """The side-by-side table: completion, tries, wall time, throughput."""
    print(f"  {'sampler':10s} {'templates at ' + str(n):>16s} {'tries':>10s} {'wall s':>8s} "
          f"{'instances/s':>12s}")
    for r in runs:
        rate = r.instances / r.seconds if r.seconds else float("inf")
        print(f"  {r.name:10s} {f'{r.complete(n)}/{count}':>16s} {r.tries:>10,d} "
              f"{r.seconds:>8.2f} {rate:>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-template", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tries-per-instance", type=int, default=2_000,
                        help="rejection budget per requested instance (the engine's default)")
    args = parser.parse_args()
    n = args.per_template
    if SHARED.is_dir():
        templates = load_templates(SHARED)
        print(f"{len(templates)} GSM-Symbolic templates from {SHARED}, {n} instances each, "
              f"seed {args.seed}, at most max({20_000}, {args.max_tries_per_instance} x {n}) "
              f"tries per template")
    else:
        print(f"skipped the GSM-Symbolic comparison: {SHARED} is not present (only the project's "
              f"workspace has ../shared); running one built-in tight-divisibility template")
        templates = [parse_template(TIGHT_DIVISIBILITY, "built-in")]
    sys.stdout.flush()
    kwargs = {"seed": args.seed, "max_tries_per_instance": args.max_tries_per_instance}
    construct = run("construct", TemplateEngine(**kwargs), templates, n)
    reject = run("reject", TemplateEngine(strategy="reject", **kwargs), templates, n)
    print("\nall templates")
    table([construct, reject], n, len(templates))
    print(f"  ratio reject/construct: tries {reject.tries / max(construct.tries, 1):.1f}x, "
          f"wall {reject.seconds / construct.seconds:.1f}x; instances/s construct/reject "
          f"{(construct.instances / construct.seconds) / (reject.instances / reject.seconds):.1f}x")

    took_over = [i for i, r in enumerate(construct.results) if r.sampler == "construct"]
    if took_over:
        sub = [Run(r.name, [r.results[i] for i in took_over],
                   sum(r.results[i].seconds for i in took_over)) for r in (construct, reject)]
        print(f"\nthe {len(took_over)} templates where construction took over (fewer than "
              f"{TemplateEngine().min_acceptance:.0%} of the first {TemplateEngine().probe_tries} "
              f"rejection draws met the conditions); wall = the sum of their instantiations")
        table(sub, n, len(took_over))
        print(f"  ratio reject/construct: tries {sub[1].tries / max(sub[0].tries, 1):.1f}x, "
              f"wall {sub[1].seconds / sub[0].seconds:.1f}x")
        print("\n  slowest under rejection:  id  reject tries / s  ->  construct tries / s")
        slow = sorted(took_over, key=lambda i: -reject.results[i].seconds)[:8]
        for i in slow:
            c, r = construct.results[i], reject.results[i]
            print(f"  {str(c.template.template_id):>26s}  {r.tries:>7,d} / {r.seconds:5.2f}  ->  "
                  f"{c.tries:>6,d} / {c.seconds:5.2f}")
    failed = [r for r in construct.results if not r.ok]
    for r in failed:
        print(f"\nnot instantiated: {(r.error or '')[:400]}")


if __name__ == "__main__":
    main()
