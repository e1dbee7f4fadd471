"""`cca-ray circuits train | prune | bridges | report | run`: thin argument parsing over circuits.run."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _config(args: argparse.Namespace):
    from cca_ray.circuits.config import load_circuits_config

    if args.config is None and Path(args.out, "config.yaml").is_file():
        return load_circuits_config(Path(args.out, "config.yaml"))
    return load_circuits_config(args.config)


def _setup(args: argparse.Namespace, check: bool = True):
    """Logging to stdout and OUT/run.log, the config, and (``check``) its record in OUT; returns
    the run's Artifacts."""
    from cca_ray.circuits.artifacts import Artifacts
    from cca_ray.circuits.run import check_out
    from cca_ray.logs import setup_logging

    setup_logging(args.out)
    c = _config(args)
    if check:
        check_out(c, Path(args.out))
    return Artifacts(c, args.out)


def _ray(args: argparse.Namespace) -> None:
    from cca_ray.ray_base import init_ray

    init_ray(getattr(args, "address", None), getattr(args, "num_cpus", None))


def cmd_train(args: argparse.Namespace) -> int:
    """Train the config's variants (or the named ones) into OUT/stages."""
    from cca_ray.circuits.run import train_all

    a = _setup(args)
    names = args.variant or [v.name for v in a.c.variants]
    for n in names:
        a.c.variant(n)  # a clear error for an unknown name, before any work
    if len(names) > 1:
        _ray(args)
    train_all(a, names, progress=not args.quiet)
    print(f"trained {', '.join(names)} in {args.out}/stages")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune (with the Tune search unless --no-search) each (variant, task) into OUT/circuits."""
    from cca_ray.circuits.report import summarize
    from cca_ray.circuits.run import prune_all, pruned

    a = _setup(args)
    names = args.variant or [v.name for v in a.c.variants]
    tasks = args.task or a.c.tasks
    for n in names:
        a.c.variant(n)
    search = not args.no_search
    if search:
        _ray(args)
    pairs = [(n, task) for n in names for task in tasks]
    existed = {p for p in pairs if pruned(a, *p, search) and not args.force}
    for n, task in pairs:
        if (n, task) in existed:
            print(f"{n}/{task}: circuit exists (--force to prune again)")
    circuits = prune_all(a, pairs, search, progress=not args.quiet, force=args.force)
    for (n, task), ci in circuits.items():
        if (n, task) in existed:
            continue
        size = (f"{ci['n_nodes']} nodes, {ci['n_edges']} edges, task loss {ci['task_loss']:.3f}"
                if ci["reached"] else "target loss not reached")
        print(f"{n}/{task}: {size}")
    summarize(a)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild circuits.json and report.md from the finished circuits and print the report."""
    from cca_ray.circuits.report import summarize
    from cca_ray.circuits.run import redraw

    a = _setup(args, check=False)
    if args.redraw:
        print(f"redrew {', '.join(redraw(a)) or 'nothing (no finished circuit)'}")
    summarize(a)
    print(Path(args.out, "report.md").read_text(), end="")
    return 0


def cmd_bridges(args: argparse.Namespace) -> int:
    """Train (or reuse) the bridges between the trained dense and sparse variants; print their check."""
    from cca_ray.circuits.report import summarize

    a = _setup(args)
    b = a.c.bridges
    for n in (b.dense, b.sparse):
        a.model_dir(a.c.variant(n).name)  # clear errors: unknown or untrained variant
    if a.bridges(progress=not args.quiet) is None:
        print("bridges are disabled in this config (bridges.enabled: false)")
        return 0
    summarize(a)
    print(Path(args.out, "report.md").read_text(), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Everything on the config (default: the built-in CPU-sized run): data, train, prune, report."""
    from cca_ray.circuits.run import run_all

    a = _setup(args)
    _ray(args)
    start = time.perf_counter()
    run_all(a, search=not args.no_search, progress=not args.quiet)
    print(Path(args.out, "report.md").read_text(), end="")
    print(f"wrote {Path(args.out) / 'circuits.json'} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `circuits` command group of the main parser."""
    group = sub.add_parser("circuits", help="weight-sparse transformers and their pruned circuits")
    csub = group.add_subparsers(dest="circuits_command", required=True)

    def common(p: argparse.ArgumentParser, ray_args: bool = True) -> None:
        p.add_argument("--config", help="circuits YAML (default: OUT/config.yaml if present, else built-in; "
                                        "see tune_configs/circuits-default.yaml)")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if ray_args:
            p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
            p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray started by this command")

    tr = csub.add_parser("train", help="build the corpus and tokenizer, train the sparse and dense models")
    common(tr)
    tr.add_argument("--variant", action="append", help="only this variant (repeatable)")
    tr.set_defaults(func=cmd_train)

    pr = csub.add_parser("prune", help="learned pruning per (model, task), hyperparameters searched by Tune")
    common(pr)
    pr.add_argument("--variant", action="append", help="only this variant (repeatable)")
    pr.add_argument("--task", action="append", help="only this task (repeatable)")
    pr.add_argument("--no-search", action="store_true", help="one pruning with the config's values")
    pr.add_argument("--force", action="store_true", help="prune again where a circuit exists")
    pr.set_defaults(func=cmd_prune)

    br = csub.add_parser("bridges",
                         help="encoders/decoders between the dense and sparse models, checked on tasks")
    common(br, ray_args=False)
    br.set_defaults(func=cmd_bridges)

    rp = csub.add_parser("report", help="circuits.json and report.md from finished circuits")
    common(rp, ray_args=False)
    rp.add_argument("--redraw", action="store_true",
                    help="rebuild each circuit's JSON, picture and snippets from its stored pruning result")
    rp.set_defaults(func=cmd_report)

    rn = csub.add_parser("run", help="the default config end to end: OUT/circuits.json")
    common(rn)
    rn.add_argument("--no-search", action="store_true", help="prune once per (model, task), no Tune")
    rn.set_defaults(func=cmd_run)
