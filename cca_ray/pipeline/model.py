"""The base model of a run: where it lives (the built-in model built, a packaged GGUF converted, into
the cache first), its tokenizer and prompt, loaded lazily; and the run's problems."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cca_ray.config import BUILTIN, CCAConfig, ConfigError
from cca_ray.data.gsm_symbolic import Problem, load_hub, load_jsonl
from cca_ray.data.prompts import build_prompt
from cca_ray.data.templates import instantiate_templates, load_templates

log = logging.getLogger("cca_ray")


class Loaded:
    """The base model (loaded on first use: a process that only drives a remote sampler never
    holds the weights), its tokenizer, where it came from, and how it is prompted."""

    def __init__(self, path: str, tokenizer, local_tasks: Path | None, dtype: str = "float32",
                 model: torch.nn.Module | None = None):
        self.path, self.tokenizer, self.local_tasks, self.dtype = path, tokenizer, local_tasks, dtype
        self._model = model

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            from transformers import AutoModelForCausalLM

            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, self.dtype))
            self._model = model.to(device).eval()
        return self._model

    def prompt(self, config: CCAConfig):
        data = config.data
        return lambda q: build_prompt(q, data.n_shots, data.chat_template, self.tokenizer)


def check_builtin_data(config: CCAConfig) -> None:
    """The built-in model was trained around exactly one set of val/test problems: other data
    settings would put its training questions into val/test, so refuse them at the edge."""
    from cca_ray.tiny.build import BuildSettings

    build, data = BuildSettings(), config.data
    want = {"source": "templates", "path": BUILTIN, "instances_per_template": build.instances_per_template,
            "seed": build.seed, "split_ratios": (0.52, 0.08, 0.40), "n_shots": 0, "chat_template": False}
    bad = [f"data.{k} = {getattr(data, k)!r} (needs {v!r})" for k, v in want.items()
           if (tuple(getattr(data, k)) if k == "split_ratios" else getattr(data, k)) != v]
    if bad:
        raise ConfigError("model.name 'builtin' was trained around the built-in data split; "
                          + "; ".join(bad) + ". Use tune_configs/default.yaml's data section.")


def model_path(config: CCAConfig, progress: bool = True) -> tuple[str, Path | None]:
    """Where the base model lives (the built-in one is built, a packaged GGUF converted, into the
    cache first) and its folder of local lm-eval tasks, if any."""
    from cca_ray.packaged import gguf_model_dir, is_gguf_source

    name = config.model.name
    if name == BUILTIN:
        from cca_ray.tiny.build import default_model_dir, ensure_built, is_built

        check_builtin_data(config)
        settings = builtin_settings(config)
        if not is_built(default_model_dir(settings)):
            log.info("building the built-in model (%d training steps; about 15 minutes on 2 quiet cores "
                     "at the default 3600) into %s", settings.spec.steps, default_model_dir(settings))
        path = ensure_built(settings, progress=progress)
        return str(path), path / "tasks"
    if is_gguf_source(name):
        path = gguf_model_dir(name, progress=progress)
        return str(path), path / "tasks"
    return name, (Path(name) / "tasks" if Path(name, "tasks").is_dir() else None)


def builtin_settings(config: CCAConfig):
    """Build settings of the built-in model variant the config names (model.builtin_steps)."""
    from dataclasses import replace

    from cca_ray.tiny.build import BuildSettings

    s = BuildSettings()
    steps = config.model.builtin_steps
    return replace(s, spec=replace(s.spec, steps=steps)) if steps else s


def load_model(config: CCAConfig, progress: bool = True) -> Loaded:
    """The base model: the built-in tiny model (built once into the cache) or an HF id/folder.
    The tokenizer and architecture are checked now; the weights load on first use."""
    from transformers import AutoConfig, AutoTokenizer

    from cca_ray.components import adapter_for

    path, local_tasks = model_path(config, progress)
    adapter_for(AutoConfig.from_pretrained(path), config.model.architecture)  # fail before any work
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Loaded(path, tokenizer, local_tasks, config.model.dtype)


def load_problems(config: CCAConfig) -> list[Problem]:
    data = config.data
    if data.source == "templates":
        from cca_ray.data.basic_templates import template_folder

        templates = load_templates(template_folder(data.path))
        problems, failures = instantiate_templates(templates, data.instances_per_template, data.seed)
        for reason in failures:
            log.warning("skipping template: %s", reason)
        return problems
    return load_jsonl(data.path) if data.source == "jsonl" else load_hub(data.hub_config)
