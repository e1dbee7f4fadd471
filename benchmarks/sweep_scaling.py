"""Wall time of an 8-trial Tune search against one trial run alone, same model, side by side in one
run (target: 8 trials <= 3x one trial). Both start from an empty output folder, so both pay the
shared stages (base evaluation, traces, localisation) once; the search's trials then share them,
its masks are cached per lambda, and ASHA stops weak trials early.

    .venv/bin/python benchmarks/sweep_scaling.py [--config tune_configs/default.yaml] [--trials 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def sweep_file(folder: Path, config: Path, samples: int, steps: int) -> Path:
    """A one-model sweep over `config` with `samples` trials."""
    (folder / "model.yaml").write_text(config.read_text())
    overrides = {"tune": {"num_samples": samples}, "update": {"steps": steps, "random_seeds": 0}}
    path = folder / f"sweep-{samples}.yaml"
    path.write_text(yaml.safe_dump({"models": [{"key": "model", "config": "model.yaml",
                                                "overrides": overrides}]}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "tune_configs" / "default.yaml")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="update steps per trial")
    parser.add_argument("--keep", type=Path, help="keep the two sweep folders here")
    args = parser.parse_args()

    import ray

    from cca_ray.launch.sweep import run_sweep

    work = Path(tempfile.mkdtemp(prefix="cca-sweep-bench-"))
    ray.init(address="local", include_dashboard=False)
    seconds, results = {}, {}
    try:
        for samples in (1, args.trials):
            out = work / f"out-{samples}"
            start = time.perf_counter()
            report = run_sweep(sweep_file(work, args.config, samples, args.steps), out)
            seconds[samples] = time.perf_counter() - start
            results[samples] = json.loads((out / "models" / "model" / "result.json").read_text())
            print(f"{samples} trial(s): {seconds[samples]:.0f} s, status {report['summary']}", flush=True)
    finally:
        ray.shutdown()
    for samples, r in results.items():
        stopped = sum(t["status"] == "STOPPED" for t in r["trials"])
        print(f"  {samples} trial(s): best lambda {r['cca']['lambda']}, lr {r['cca']['lr']:.4g}, "
              f"test {r['cca']['test_accuracy']:.4f} (base {r['base']['test_accuracy']:.4f}); "
              f"{stopped} stopped early by ASHA")
    ratio = seconds[args.trials] / seconds[1]
    print(f"ratio {args.trials} trials / 1 trial: {ratio:.2f}x (target <= 3x)")
    if args.keep:
        shutil.copytree(work, args.keep, dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
