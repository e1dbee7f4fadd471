"""`cca-ray compare`: CCA against its baselines on one model. The shared stages and CCA's mask once,
then each method's lr search (the same number of Tune trials each; one method after another, so
each wall time is the method's own), then each method's chosen lr on the test split and the
general suite. A finished method is kept in DIR/compare/<method>.json, so --resume goes on."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import ray

from cca_ray.config import CCAConfig, ConfigError, dump_config
from cca_ray.io import write_json, write_text
from cca_ray.launch.search import display_name, make_tuner, model_group, trial_rows
from cca_ray.logs import log_to
from cca_ray.ray_base import actor_options, init_ray

log = logging.getLogger("cca_ray")


def compare_model(config: CCAConfig, out: str | Path, resume: bool = False, progress: bool = True,
                  address: str | None = None, num_cpus: int | None = None) -> dict:
    """Every method of compare.methods tuned, tested and reported (comparison.json/.md, plots)."""
    from ray.util.placement_group import remove_placement_group

    from actors.evaluator import CompareEvalActor
    from actors.sampler import SamplerClient
    from cca_ray.pipeline.model import model_path
    from cca_ray.pipeline.run import Pipeline
    from cca_ray.reports.compare import build_comparison, write_comparison

    start = time.time()
    root = Path(out).resolve()
    if (root / "comparison.json").is_file() and not resume:
        raise ConfigError(f"{root} already holds a comparison: add --resume to reuse it, "
                          "or choose a new --out")
    root.mkdir(parents=True, exist_ok=True)
    log_to(root / "run.log")
    write_text(dump_config(config), root / "config.yaml")
    init_ray(address, num_cpus)
    path, _ = model_path(config, progress)
    pg, sampler = model_group(config, path)
    methods: dict[str, dict] = {}
    try:
        pipe = Pipeline(config, root, progress, sampler=SamplerClient(sampler))
        prep = pipe.prepare()
        log.info("compare: shared stages ready (%d train pivots, %d held out); methods %s", len(prep.pivots),
                 len(prep.heldout), config.compare.methods)
        evaluator = CompareEvalActor.options(**actor_options(config.resources.eval, pg, 1)).remote(
            config.model_dump(by_alias=True), str(root), sampler)
        base = ray.get(evaluator.base.remote())
        for name in config.compare.methods:
            done = root / "compare" / f"{name}.json"
            if resume and done.is_file():
                methods[name] = json.loads(done.read_text())
                log.info("compare: %s already finished (%s)", name, done)
                continue
            t0 = time.time()
            log.info("compare: %s: %d Tune trials over lr", name, config.compare.num_samples)
            results = make_tuner("compare", config, root, sampler, resume, name).fit()
            tune_s = time.time() - t0
            if not any(res.metrics and res.metrics.get("objective") is not None for res in results):
                errors = [str(res.error)[-800:] for res in results if res.error] or ["none"]
                raise RuntimeError(f"compare: no {name} trial reported a validation "
                                   f"(see {root / 'run.log'}); last error: {errors[-1]}")
            best = results.get_best_result(metric="objective", mode="max", scope="all")
            res = ray.get(evaluator.method.remote(name, best.config["lr"]))
            res |= {"tune_seconds": round(tune_s, 1), "wall_seconds": round(time.time() - t0, 1),
                    "trials": trial_rows(results)}
            write_json(res, done)
            methods[name] = res
            log.info("compare: %s: lr %.3g, test %.4f (%.1f min)", name, res["lr"], res["test_accuracy"],
                     res["wall_seconds"] / 60)
        ray.kill(evaluator)
    finally:
        ray.kill(sampler)
        remove_placement_group(pg)
    report = build_comparison(display_name("compare", config).removeprefix("compare: "), base, methods,
                              {"trials_per_method": config.compare.num_samples,
                               "wall_seconds": round(time.time() - start, 1),
                               "shared_stages": {"computed": pipe.store.computed,
                                                 "reused": pipe.store.reused}})
    write_comparison(report, root)
    return report
