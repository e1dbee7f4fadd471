"""The `cca-ray` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cca_ray.config import load_config
from cca_ray.data.gsm_symbolic import load_jsonl
from cca_ray.data.splits import split_counts

CLI = Path(sys.executable).parent / "cca-ray"
BUILTIN = len(list((Path(__file__).resolve().parents[1] / "cca_ray/tiny/templates").glob("*.json")))


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_lists_the_commands():
    out = run("--help").stdout
    for command in ("demo", "data", "config"):
        assert command in out
    assert "instantiate" in run("data", "--help").stdout


def test_help_does_not_load_torch_and_every_user_error_is_caught():
    code = ("import sys\nfrom cca_ray.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch loaded:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip().endswith("torch loaded: False"), out[-300:]
    from cca_ray.components import UnsupportedArchitecture
    from cca_ray.config import ConfigError
    from cca_ray.data.gsm_symbolic import DataError
    from cca_ray.data.templates import TemplateError
    from cca_ray.dcm import DCMError
    from cca_ray.errors import UserError
    from cca_ray.localize import LocalizationError
    from cca_ray.update import UpdateError

    for cls in (ConfigError, DataError, TemplateError, LocalizationError, DCMError, UpdateError,
                UnsupportedArchitecture):
        assert issubclass(cls, UserError), cls  # what main() prints as `cca-ray: error: ...`


def test_instantiate_and_split_builtin(tmp_path):
    out = tmp_path / "p.jsonl"
    proc = run("data", "instantiate", "--templates", "builtin", "--per-template", "10",
               "--seed", "5", "--out", str(out), "--quiet")
    assert f"instantiated {BUILTIN}/{BUILTIN} templates, {BUILTIN * 10} problems" in proc.stdout
    problems = load_jsonl(out)
    assert len(problems) == BUILTIN * 10
    proc = run("data", "split", "--input", str(out), "--out", str(tmp_path / "s"))
    assert f"train: {BUILTIN * 5} problems over {BUILTIN} templates" in proc.stdout  # 5/1/4 of 10
    assert len(load_jsonl(tmp_path / "s" / "test.jsonl")) == BUILTIN * 4


def test_instantiate_shared_templates_reports_failures(tmp_path, shared_templates_dir):
    out = tmp_path / "gsym.jsonl"
    proc = run("data", "instantiate", "--templates", str(shared_templates_dir),
               "--per-template", "50", "--seed", "0", "--out", str(out), "--quiet")
    ok = int(proc.stdout.split("instantiated ")[1].split("/")[0])
    assert ok >= 95
    assert proc.stderr.count("FAILED") == 100 - ok
    assert len(load_jsonl(out)) == ok * 50


def test_bad_input_gives_a_clear_error_and_exit_code(tmp_path):
    proc = run("data", "instantiate", "--templates", str(tmp_path / "nope"), "--out",
               str(tmp_path / "x.jsonl"), check=False)
    assert proc.returncode == 2 and "no such template folder" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("dcm:\n  lr: -1\n")
    proc = run("config", "check", str(bad), check=False)
    assert proc.returncode == 2 and "dcm.lr" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("config", [None, "tune_configs/default.yaml"])
def test_demo_runs_the_data_stage_end_to_end(tmp_path, config):
    args = ["demo", "--out", str(tmp_path / "demo")]
    if config:
        args += ["--config", str(Path(__file__).resolve().parents[1] / config)]
    run(*args)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    per = load_config(args[-1]).data.instances_per_template if config else 50
    assert summary["templates"] == BUILTIN and summary["problems"] == BUILTIN * per
    train, val, test = split_counts(per, (0.52, 0.08, 0.40))
    assert summary["splits"] == {"train": BUILTIN * train, "val": BUILTIN * val,
                                 "test": BUILTIN * test}
    assert summary["reference_solution_macro_accuracy"] == 1.0
    prompt = (tmp_path / "demo" / "prompt_example.txt").read_text()
    assert prompt.rstrip().endswith("A: Let's think step by step.")
