"""Shared fixtures. Tests that read ../shared skip cleanly when it is absent (a user's clone); the
small built-in model is built once per session for every test module that needs it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_TEMPLATES = REPO.parent / "shared" / "data" / "gsm-symbolic" / "templates" / "symbolic"
BUILTIN_TEMPLATES = REPO / "cca_ray" / "tiny" / "templates"
SMALL_TOKENS = 24  # generation limit of the tests that run the pipeline on the small model


@pytest.fixture(scope="session")
def shared_templates_dir() -> Path:
    if not SHARED_TEMPLATES.is_dir():
        pytest.skip(f"{SHARED_TEMPLATES} not present (only the project's workspace has ../shared)")
    return SHARED_TEMPLATES


@pytest.fixture(scope="session")
def builtin_templates_dir() -> Path:
    return BUILTIN_TEMPLATES


@pytest.fixture(scope="session")
def small_settings():
    """Build settings for a small built-in model that trains in seconds."""
    from cca_ray.tiny.build import BuildSettings
    from cca_ray.tiny.model import TinySpec

    return BuildSettings(
        spec=TinySpec(hidden_size=64, intermediate_size=128, layers=2, heads=2, kv_heads=1,
                      head_dim=32, steps=40, batch_size=16, warmup=5),
        instances_per_template=10, train_pool_per_template=20, world_countries=8,
        eval_max_new_tokens=24,
    )


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, small_settings) -> Path:
    """The small built-in model's HF folder (model, tokenizer, build report, lm-eval tasks)."""
    from cca_ray.tiny.build import build

    return build(tmp_path_factory.mktemp("tiny") / "model", small_settings, progress=False)


@pytest.fixture(scope="session")
def problems_file(small_model, tmp_path_factory) -> Path:
    """Problems for the small model with contrasting traces: half take its own greedy answer as
    gold (greedy right), half that answer + 1 (greedy wrong)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cca_ray.data.answers import extract_answer
    from cca_ray.data.prompts import build_prompt
    from cca_ray.data.templates import instantiate_templates, load_templates
    from cca_ray.io import write_jsonl
    from cca_ray.sampling import make_sampler
    from cca_ray.tiny import TEMPLATES_DIR

    tok = AutoTokenizer.from_pretrained(small_model)
    model = AutoModelForCausalLM.from_pretrained(small_model).eval()
    problems, _ = instantiate_templates(load_templates(TEMPLATES_DIR)[:4], 16, seed=3, progress=False)
    sampler = make_sampler("hf", model=model, tokenizer=tok, batch_size=64, max_new_tokens=SMALL_TOKENS,
                           progress=False)
    outs = sampler.generate([build_prompt(p.question, 0) for p in problems])
    rows = []
    for p, o in zip(problems, outs, strict=True):
        answer = extract_answer(o[0].text)
        gold = int(answer) if answer is not None and answer == int(answer) else 7
        gold += p.instance % 2  # odd instances: greedy is wrong
        rows.append(p.to_row() | {"answer": f"Made-up solution.\n#### {gold}"})
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    write_jsonl(rows, path)
    return path


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray (2 CPUs) for one test module, shut down after it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
