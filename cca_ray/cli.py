"""The `cca-ray` command line: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cca_ray import __version__
from cca_ray.logs import setup_logging


def _templates_path(path: str) -> Path:
    from cca_ray.data.basic_templates import template_folder

    return template_folder(path)


def cmd_instantiate(args: argparse.Namespace) -> int:
    """Instantiate templates into hub-schema JSONL; report successes and why any failed."""
    from cca_ray.data.gsm_symbolic import write_problems
    from cca_ray.data.templates import instantiate_templates, load_templates

    templates = load_templates(_templates_path(args.templates))
    problems, failures = instantiate_templates(
        templates, args.per_template, args.seed, args.max_tries_per_instance, not args.quiet)
    if problems:
        write_problems(problems, args.out)
    ok = len(templates) - len(failures)
    print(f"instantiated {ok}/{len(templates)} templates, {len(problems)} problems "
          f"({args.per_template} per template, seed {args.seed})"
          + (f" -> {args.out}" if problems else ""))
    for reason in failures:
        print(f"  FAILED {reason}", file=sys.stderr)
    return 0 if problems else 1


def cmd_split(args: argparse.Namespace) -> int:
    """Split a problems JSONL per template into train/val/test JSONL files."""
    from cca_ray.data.gsm_symbolic import load_jsonl
    from cca_ray.data.splits import split_problems, write_splits

    splits = split_problems(load_jsonl(args.input), tuple(args.ratios), seed=args.seed)
    paths = write_splits(splits, args.out)
    templates = len({p.id for p in splits.test})
    for name, part in splits.items():
        print(f"{name}: {len(part)} problems over {templates} templates -> {paths[name]}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate a config file and print it with every default filled in."""
    from cca_ray.config import dump_config, load_config

    print(dump_config(load_config(args.config)), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The data stage of the default run, end to end: templates -> instances -> splits ->
    prompts -> answer checking of the reference solutions. Writes DIR/summary.json."""
    from cca_ray.config import CCAConfig, load_config
    from cca_ray.data.answers import is_correct, macro_accuracy
    from cca_ray.data.gsm_symbolic import load_jsonl, write_problems
    from cca_ray.data.prompts import build_prompt, solution_to_cot
    from cca_ray.data.splits import split_problems, write_splits
    from cca_ray.data.templates import instantiate_templates, load_templates
    from cca_ray.io import write_json, write_text

    start = time.perf_counter()
    config = load_config(args.config) if args.config else CCAConfig()
    data = config.data
    out = Path(args.out)
    if data.source == "templates":
        templates = load_templates(_templates_path(data.path))
        problems, failures = instantiate_templates(templates, data.instances_per_template, data.seed)
        for reason in failures:
            print(f"skipping {reason}", file=sys.stderr)
        write_problems(problems, out / "problems.jsonl")
    elif data.source == "jsonl":
        problems = load_jsonl(data.path)
    else:
        from cca_ray.data.gsm_symbolic import load_hub

        problems = load_hub(data.hub_config)
    splits = split_problems(problems, data.split_ratios, seed=data.seed)
    write_splits(splits, out)
    example = splits.test[0]
    write_text(build_prompt(example.question, data.n_shots) + "\n", out / "prompt_example.txt")
    # The reference solutions, written the way the model is prompted to answer, must all score
    # correct through the extractor: a check of the whole data path on every problem.
    scored = [(p.id, is_correct(solution_to_cot(p.answer), p.gold)) for p in splits.test]
    summary = {
        "stage": "data (model stages arrive with the built-in model and the core pipeline)",
        "templates": len({p.id for p in problems}),
        "problems": len(problems),
        "splits": {name: len(part) for name, part in splits.items()},
        "reference_solution_macro_accuracy": macro_accuracy(scored),
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(summary, out / "summary.json")
    for key, value in summary.items():
        print(f"{key}: {value}")
    print(f"wrote {out}/problems.jsonl, train/val/test.jsonl, prompt_example.txt, summary.json")
    return 0


def cmd_tiny_build(args: argparse.Namespace) -> int:
    """Build the built-in tiny model; the folder's path is the last line printed."""
    from dataclasses import replace

    from cca_ray.tiny.build import BuildSettings, build, default_model_dir, is_built

    settings = BuildSettings(seed=args.seed)
    if args.steps:
        settings = replace(settings, spec=replace(settings.spec, steps=args.steps))
    out = Path(args.out) if args.out else default_model_dir(settings)
    if is_built(out) and not args.force:
        print(f"already built (use --force to rebuild): {out / 'build_report.json'}")
    else:
        build(out, settings, progress=not args.quiet, force=True)
    report = json.loads((out / "build_report.json").read_text())
    seen, held = report["test_accuracy_seen_templates"], report["test_accuracy_held_out_templates"]
    print(f"greedy test accuracy: seen templates {seen:.3f}, held-out templates {held:.3f} "
          f"({report['test_problems']} test problems)")
    below = report["templates_below_threshold"]
    print(f"templates below {report['threshold']} (train+val): {len(below)}: {', '.join(below)}")
    for name, g in report["general"].items():
        print(f"{name}: {g['metric']} {g['score']:.3f} +- {g['stderr']:.3f} "
              f"(chance {g['chance']:.2f})")
    print(f"train {report['train_seconds']} s, build {report['build_seconds']} s")
    print(out)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The whole CCA pipeline on one model; resumes from OUT's stage folders."""
    import signal

    from cca_ray.config import load_config
    from cca_ray.pipeline.run import Pipeline
    from cca_ray.reports.run import render_markdown

    config = load_config(args.config)
    out = Path(args.out)
    setup_logging(out)
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the vLLM engine's worker processes are shut down too;
    # finished stages are on disk either way and a rerun resumes from them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = Pipeline(config, out, progress=not args.quiet).run()
    print(render_markdown(report))
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """The Tune search for every model of a sweep file, then the cross-model report."""
    import signal

    from cca_ray.launch.sweep import run_sweep
    from cca_ray.reports.sweep import render_sweep_markdown

    out = Path(args.out)
    setup_logging(out, "sweep.log")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run_sweep(args.sweep, out, resume=args.resume, address=args.address, num_cpus=args.num_cpus)
    print(render_sweep_markdown(report))
    print(f"wrote {out / 'sweep_report.json'} and {out / 'sweep_report.md'}")
    return 0 if report["summary"]["failed"] == 0 else 1


def cmd_compare(args: argparse.Namespace) -> int:
    """CCA against full fine-tuning, LoRA, no-mask and random components on one model."""
    import signal

    from cca_ray.config import load_config
    from cca_ray.launch.compare import compare_model
    from cca_ray.reports.compare import render_markdown

    config = load_config(args.config)
    out = Path(args.out)
    setup_logging(out, "compare.log")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = compare_model(config, out, resume=args.resume, progress=not args.quiet, address=args.address,
                           num_cpus=args.num_cpus)
    print(render_markdown(report))
    print(f"wrote {out / 'comparison.json'}, {out / 'comparison.md'} and {out / 'plots'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild a sweep's cross-model report from its finished per-model results."""
    from cca_ray.config import ConfigError
    from cca_ray.reports.sweep import build_sweep_report, render_sweep_markdown

    if not Path(args.dir, "models").is_dir() and not Path(args.dir, "sweep_plan.json").is_file():
        raise ConfigError(f"{args.dir}: not a sweep folder (no models/ or sweep_plan.json); "
                            "pass the --out folder of `cca-ray sweep`")
    report = build_sweep_report(args.dir)
    print(render_sweep_markdown(report))
    return 0


def cmd_apply_delta(args: argparse.Namespace) -> int:
    """Rebuild an updated model from its base and a sparse row delta."""
    from cca_ray.update import apply_delta

    out = apply_delta(args.base, args.delta, args.out, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def cmd_export_lora(args: argparse.Namespace) -> int:
    """A run's sparse delta as a peft LoRA adapter (exact: a row update is a low-rank product)."""
    from cca_ray.update.lora_export import export_lora, vllm_max_lora_rank

    info = export_lora(args.run, args.out, base=args.base)
    serve = vllm_max_lora_rank(info["max_rank"])
    hint = (f"serve it with vLLM's enable_lora=True, max_lora_rank={serve}" if serve else
            "above vLLM's largest max_lora_rank (512): serve the merged model (cca-ray apply-delta) instead")
    print(f"wrote {info['path']}: {info['modules']} modules, ranks up to {info['max_rank']}; {hint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cca-ray",
        description="Constructive Circuit Amplification over many base models, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"cca-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the default job on the built-in world")
    demo.add_argument("--config", help="YAML config (default: built-in defaults)")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="the CCA pipeline end to end on one model (resumable)")
    run.add_argument("--config", default="tune_configs/default.yaml", help="YAML config")
    run.add_argument("--out", required=True, help="output folder (stages, report.json, report.md)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    sw = sub.add_parser("sweep", help="Ray Tune over lambda and lr for every model of a sweep file")
    sw.add_argument("sweep", help="sweep YAML (e.g. tune_configs/sweep-default.yaml)")
    sw.add_argument("--out", required=True, help="output folder (per-model results, sweep report)")
    sw.add_argument("--resume", action="store_true",
                    help="continue an interrupted sweep in OUT (finished trials and stages are kept)")
    sw.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    sw.add_argument("--num-cpus", type=int, help="CPUs of a local Ray started by this command")
    sw.set_defaults(func=cmd_sweep)

    cmp = sub.add_parser("compare", help="CCA vs full fine-tuning, LoRA, no-mask and random components, "
                                         "each method's lr tuned with the same number of Tune trials")
    cmp.add_argument("--config", required=True, help="the model's config (e.g. tune_configs/default.yaml)")
    cmp.add_argument("--out", required=True, help="output folder (comparison.json/.md, plots/, stages)")
    cmp.add_argument("--resume", action="store_true",
                     help="continue in OUT: finished methods, trials and stages are kept")
    cmp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    cmp.add_argument("--num-cpus", type=int, help="CPUs of a local Ray started by this command")
    cmp.add_argument("--quiet", action="store_true", help="no progress bars")
    cmp.set_defaults(func=cmd_compare)

    rep = sub.add_parser("report", help="rebuild a sweep's cross-model report from finished results")
    rep.add_argument("dir", help="the --out folder of `cca-ray sweep`")
    rep.set_defaults(func=cmd_report)

    ad = sub.add_parser("apply-delta", help="rebuild an updated model: BASE + sparse DELTA -> OUT")
    ad.add_argument("base", help="base model folder or hub id")
    ad.add_argument("delta", help="the .safetensors row delta written by `cca-ray run`")
    ad.add_argument("out", help="output HF folder")
    ad.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ad.set_defaults(func=cmd_apply_delta)

    el = sub.add_parser("export-lora", help="a run's sparse delta as a peft LoRA adapter (exact)")
    el.add_argument("run", help="a `cca-ray run` output folder (or its cca_delta.safetensors)")
    el.add_argument("out", help="adapter folder to write (adapter_config.json, adapter_model.safetensors)")
    el.add_argument("--base", help="base model (default: the one the delta names)")
    el.set_defaults(func=cmd_export_lora)

    data = sub.add_parser("data", help="GSM-Symbolic data: instantiate templates, split")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    inst = data_sub.add_parser("instantiate", help="instantiate annotated templates into JSONL")
    inst.add_argument("--templates", required=True,
                      help="folder of template *.json files, a JSONL of templates, or 'builtin'")
    inst.add_argument("--per-template", type=int, default=50, help="instances per template")
    inst.add_argument("--seed", type=int, default=0)
    inst.add_argument("--out", required=True, help="output JSONL (hub schema)")
    inst.add_argument("--max-tries-per-instance", type=int, default=2000,
                      help="attempts per wanted instance before a template counts as failed")
    inst.add_argument("--quiet", action="store_true", help="no progress bar")
    inst.set_defaults(func=cmd_instantiate)

    split = data_sub.add_parser("split", help="split problems per template into train/val/test")
    split.add_argument("--input", required=True, help="problems JSONL (hub schema)")
    split.add_argument("--out", required=True, help="folder for train/val/test.jsonl")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--ratios", type=float, nargs=3, default=[0.52, 0.08, 0.40],
                       metavar=("TRAIN", "VAL", "TEST"))
    split.set_defaults(func=cmd_split)

    tiny = sub.add_parser("tiny", help="the built-in tiny model and its world")
    tiny_sub = tiny.add_subparsers(dest="tiny_command", required=True)
    tb = tiny_sub.add_parser("build", help="train the built-in model on CPU (fixed step count)")
    tb.add_argument("--out", help="output folder (default: cache folder keyed by the settings)")
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument("--steps", type=int, help="training steps (default: the built-in setting)")
    tb.add_argument("--force", action="store_true", help="rebuild even if the folder is built")
    tb.add_argument("--quiet", action="store_true", help="no progress bars")
    tb.set_defaults(func=cmd_tiny_build)

    from cca_ray.circuits.cli import add_parser as add_circuits

    add_circuits(sub)

    config = sub.add_parser("config", help="configuration files")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a config and print it resolved")
    check.add_argument("config")
    check.set_defaults(func=cmd_config_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cca-ray` console script."""
    from cca_ray.errors import UserError  # not the error classes' modules: --help must not load torch

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as exc:  # every message names its fix
        print(f"cca-ray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
