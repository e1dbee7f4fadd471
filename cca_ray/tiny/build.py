"""`cca-ray tiny build`: the built-in world end to end, on CPU, in a fixed number of steps.

Templates -> instances and per-template splits -> training texts (never a val/test question:
deduplicated by question text) + the general corpus -> tokenizer -> tiny Llama -> training ->
greedy GSym accuracy and the local lm-eval tasks -> an HF folder with build_report.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cca_ray.data.answers import macro_accuracy, per_template_accuracy
from cca_ray.data.gsm_symbolic import Problem
from cca_ray.data.prompts import build_prompt, solution_to_cot
from cca_ray.data.splits import Splits, split_problems
from cca_ray.data.template_parsing import Template, load_templates
from cca_ray.data.templates import Instance, TemplateEngine, instantiate_templates
from cca_ray.io import write_json
from cca_ray.tiny import TEMPLATES_DIR
from cca_ray.tiny.model import TinySpec, make_model, train
from cca_ray.tiny.recipes import BIASED_ITEMS
from cca_ray.tiny.tokenizer import train_tokenizer
from cca_ray.tiny.world import (
    CHANCE,
    arithmetic_texts,
    make_world,
    training_texts,
    write_eval_tasks,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

N_SHOTS = 0  # the tiny model is trained and prompted zero-shot (the 8 exemplars' words are
#              outside its world); the prompt is still the data layer's, with n_shots=0.
THRESHOLD = 0.8


@dataclass(frozen=True)
class BuildSettings:
    seed: int = 0
    spec: TinySpec = field(default_factory=TinySpec)
    instances_per_template: int = 200  # 200 x 0.40 x 32 templates = 2,560 test problems
    train_pool_per_template: int = 1500  # fresh training instances (val/test ones removed)
    world_countries: int = 30
    world_copies: int = 10  # each fact in each of its forms, 10 times (short sequences)
    drill: int = 0  # arithmetic drill lines (measured: costs more math steps than it saves)
    competitor_rate: float = 0.1  # a tricky decision's competitor share in training stories
    biased_competitor_rate: float = 0.85  # ... for the biased items (coins, cards, stamps)
    eval_max_new_tokens: int = 160
    eval_batch_size: int = 64
    threads: int = 2  # training and evaluation threads: fixed, since results depend on it

    def key(self) -> str:
        """Cache key: these settings plus the exact template files and world code."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        for f in sorted(TEMPLATES_DIR.glob("*.json")):
            h.update(f.name.encode() + f.read_bytes())
        for module in ("world.py", "tokenizer.py", "model.py", "build.py", "recipes.py",
                       "determinism.py"):
            h.update((Path(__file__).parent / module).read_bytes())
        return h.hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("CCA_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cca-ray")
    return Path(base)


def default_model_dir(settings: BuildSettings) -> Path:
    return cache_root() / "tiny" / settings.key()


def is_built(path: Path) -> bool:
    return (path / "build_report.json").is_file() and (path / "model.safetensors").is_file()


def world_data(settings: BuildSettings, progress: bool = True
               ) -> tuple[list[Template], set, Splits, list[Problem]]:
    """(templates, held-out ids, eval splits, training problems). Training stories are fresh
    instances of the seen templates: no train, val or test question of the evaluation splits (the
    problems CCA later trains and validates on) and no held-out template is ever trained on. Their
    solutions carry the world's competitor operations (see recipes.py and `training_answer`)."""
    templates = load_templates(TEMPLATES_DIR)
    held_out = {t.template_id for t in templates if t.held_out}
    problems, failures = instantiate_templates(templates, settings.instances_per_template,
                                               settings.seed, progress=progress)
    if failures:
        raise RuntimeError("built-in templates failed to instantiate:\n" + "\n".join(failures))
    splits = split_problems(problems, seed=settings.seed)
    protected = {p.question for p in problems}  # every split, and the held-out templates
    seen = [t for t in templates if t.template_id not in held_out]
    # The training pool takes what each template can give: a template with fewer distinct
    # questions than asked contributes all it has (partial results, small try budget).
    engine = TemplateEngine(seed=settings.seed + 10_000, max_tries_per_instance=20, min_tries=0)
    rng = random.Random(f"competitors/{settings.seed}")
    train_problems, known = [], set()
    for t in seen:
        raw = json.loads((TEMPLATES_DIR / f"{t.template_id}.json").read_text(encoding="utf-8"))
        for inst in engine.instantiate(t, settings.train_pool_per_template).instances:
            question = inst.row["question"]
            if question in protected or question in known:
                continue
            known.add(question)
            answer = training_answer(engine, t, raw, inst, rng, settings)
            train_problems.append(Problem(**(inst.row | {"answer": answer})))
    return templates, held_out, splits, train_problems


def template_decisions() -> dict[str, list[dict]]:
    """Template id -> its decisions in order ({kind, op, competitor}), from the template files."""
    return {f.stem: json.loads(f.read_text(encoding="utf-8")).get("decisions", [])
            for f in TEMPLATES_DIR.glob("*.json")}


def world_summary(train_problems: list[Problem]) -> dict:
    """What the training stories hold at the tricky decisions: the competitor's share overall and
    for the biased items (recipes.py explains the mechanism)."""
    decisions = template_decisions()
    counts = {"biased": [0, 0], "other": [0, 0]}  # [competitor, total]
    for p in train_problems:
        steps = STEP_LINE.findall(solution_to_cot(p.answer))
        item = "biased" if any(f" {i}." in p.answer for i in BIASED_ITEMS) else "other"
        for i, d in enumerate(decisions.get(str(p.id), [])):
            if d["competitor"] and i < len(steps):
                counts[item][0] += steps[i][1] == d["competitor"]
                counts[item][1] += 1
    share = {k: (c / n if n else None) for k, (c, n) in counts.items()}
    total = counts["biased"][1] + counts["other"][1]
    return {"version": 2, "biased_items": list(BIASED_ITEMS),
            "tricky_decisions_in_training": total,
            "competitor_share_in_training": (counts["biased"][0] + counts["other"][0]) / total
            if total else None,
            "competitor_share_biased_items": share["biased"],
            "competitor_share_other_items": share["other"]}


def training_answer(engine: TemplateEngine, template: Template, raw: dict, inst: Instance,
                    rng: random.Random, settings: BuildSettings) -> str:
    """The solution a training story shows: each tricky decision takes its competitor operation
    with the item's rate (high for the biased items), so the model holds both continuations."""
    item = str(inst.variables.get("item"))
    rate = settings.biased_competitor_rate if item in BIASED_ITEMS else settings.competitor_rate
    flips = [i for i, d in enumerate(raw.get("decisions", [])) if d["competitor"] and rng.random() < rate]
    if not flips:
        return inst.row["answer"]
    alt = next(c for c in raw["competitors"] if c["flips"] == flips)
    variant = replace(template, answer_annotated=alt["answer_annotated"], answer_expression=alt["answer"])
    return engine.render(variant, inst.variables, inst.row["instance"]).row["answer"]


def math_example(p: Problem) -> tuple[str, str]:
    """(prompt, answer): exactly the evaluation prompt, then the reference chain of thought."""
    return build_prompt(p.question, N_SHOTS), f" {solution_to_cot(p.answer)}"


def math_text(p: Problem) -> str:
    return "".join(math_example(p))


def zero_shot_greedy_correct(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                             problems: list[Problem], settings: BuildSettings, progress: bool = True,
                             desc: str = "greedy eval") -> dict[tuple, bool]:
    """(id, instance) -> whether the in-memory model's greedy zero-shot answer is right."""
    from cca_ray.evaluate import greedy_correct as score
    from cca_ray.sampling.hf import HFSampler

    sampler = HFSampler(model, tokenizer, batch_size=settings.eval_batch_size,
                        max_new_tokens=settings.eval_max_new_tokens, progress=progress)
    return score(sampler, problems, lambda q: build_prompt(q, N_SHOTS), desc)


def world_task_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks_dir: Path,
                      batch_size: int = 32) -> dict:
    """The three local lm-eval tasks on the in-memory model: score, standard error, chance."""
    from cca_ray.evaluate import general_scores as scores

    out = scores(model, tokenizer, list(CHANCE), {t: 0 for t in CHANCE}, tasks_dir,
                 batch_size=batch_size, max_length=512)
    return {name: r | {"chance": CHANCE[name]} for name, r in out.items()}


def build(out_dir: Path | None = None, settings: BuildSettings | None = None,
          progress: bool = True, force: bool = False) -> Path:
    """Build the tiny model into out_dir (default: the cache folder keyed by the settings), in a
    fresh process whose numerics are pinned (ATen's AVX2 kernels, MKL's AVX2 branch, settings.threads
    threads), so a rebuild gives the same weights (cca_ray/tiny/determinism.py says how far)."""
    from cca_ray.tiny.determinism import run_deterministic

    settings = settings or BuildSettings()
    out = Path(out_dir) if out_dir else default_model_dir(settings)
    if is_built(out) and not force:
        return out
    return run_deterministic(_build, out, settings, progress, threads=settings.threads)


def _build(out: Path, settings: BuildSettings, progress: bool) -> Path:
    """The build itself (run by build() in the pinned process)."""
    start = time.perf_counter()
    templates, held_out, splits, train_problems = world_data(settings, progress)
    world = make_world(settings.seed, settings.world_countries)
    general = training_texts(world, settings.seed, settings.world_copies)
    general += arithmetic_texts(settings.seed, settings.drill)
    texts: list = [math_example(p) for p in train_problems] + general
    all_problems = splits.train + splits.val + splits.test
    vocabulary_texts = [math_text(p) for p in train_problems + all_problems] + general
    tmp = out.with_name(out.name + ".partial")
    trained = tmp / "training.json"
    if trained.is_file() and json.loads(trained.read_text()).get("key") == settings.key():
        # a crash after training (e.g. during evaluation) resumes here without retraining
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        record = json.loads(trained.read_text())
        losses, train_seconds = record["losses"], record["train_seconds"]
    else:
        tokenizer = train_tokenizer(vocabulary_texts)
        model = make_model(settings.spec, tokenizer, settings.seed)
        train_start = time.perf_counter()
        losses = train(model, tokenizer, texts, settings.spec, settings.seed, progress)
        train_seconds = time.perf_counter() - train_start
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json({"key": settings.key(), "losses": losses, "train_seconds": train_seconds},
                   trained)
    tasks_dir = write_eval_tasks(world, tmp, settings.seed)
    report = evaluate_world(model, tokenizer, splits, held_out, settings, tasks_dir, progress)
    report.update({
        "train_seconds": round(train_seconds, 1),
        "build_seconds": None,
        "train_problems": len(train_problems),
        "train_general_texts": len(general),
        "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": asdict(settings),
        "templates": {"seen": sorted(str(t.template_id) for t in templates
                                     if t.template_id not in held_out),
                      "held_out": sorted(str(t) for t in held_out)},
        "prompt": {"n_shots": N_SHOTS},
        "world": world_summary(train_problems),
    })
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    write_json(report, tmp / "build_report.json")
    trained.unlink()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # the folder appears whole or not at all
    # the task YAMLs hold absolute data paths: rewrite them for the final location
    write_eval_tasks(world, out, settings.seed)
    return out


def evaluate_world(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, splits: Splits,
                   held_out: set, settings: BuildSettings, tasks_dir: Path,
                   progress: bool = True) -> dict:
    """Greedy accuracy (test split, seen vs held-out templates; train+val per template for the
    template filter), where the test errors fall (arithmetic or decisions) and the general tasks."""
    from cca_ray.data.answers import is_correct
    from cca_ray.sampling.hf import HFSampler

    sampler = HFSampler(model, tokenizer, batch_size=settings.eval_batch_size,
                        max_new_tokens=settings.eval_max_new_tokens, progress=progress)
    texts = [o[0].text for o in sampler.generate([build_prompt(p.question, N_SHOTS) for p in splits.test],
                                                 desc="test")]
    test_correct = {p.key: is_correct(t, p.gold) for p, t in zip(splits.test, texts, strict=True)}
    seen_test = [(p.id, test_correct[p.key]) for p in splits.test if p.id not in held_out]
    held_test = [(p.id, test_correct[p.key]) for p in splits.test if p.id in held_out]
    trainval = [p for p in splits.train + splits.val if p.id not in held_out]
    tv_correct = zero_shot_greedy_correct(model, tokenizer, trainval, settings, progress, "train+val")
    tv_acc = per_template_accuracy((p.id, tv_correct[p.key]) for p in trainval)
    return {
        "trainval_accuracy_seen_templates": macro_accuracy(
            [(p.id, tv_correct[p.key]) for p in trainval]),
        "test_accuracy_seen_templates": macro_accuracy(seen_test),
        "test_accuracy_held_out_templates": macro_accuracy(held_test) if held_test else None,
        "test_problems": len(splits.test),
        "per_template_test_accuracy": {str(k): v for k, v in
                                       per_template_accuracy(seen_test + held_test).items()},
        "per_template_trainval_accuracy": {str(k): v for k, v in tv_acc.items()},
        "templates_below_threshold": sorted(str(t) for t, a in tv_acc.items() if a < THRESHOLD),
        "threshold": THRESHOLD,
        "test_steps": step_report(splits.test, texts),
        "general": world_task_scores(model, tokenizer, tasks_dir),
    }


STEP_LINE = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")  # one written step: a op b = c
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def step_report(problems: list[Problem], texts: list[str]) -> dict:
    """Where greedy solutions go wrong: the share of written steps 'a op b = c' whose arithmetic is
    right, and per decision kind how often the right operation, the competitor or neither was
    written (read against each template's decisions in its JSON file)."""
    decisions = template_decisions()
    right_arith = total_arith = 0
    kinds: dict[str, dict[str, int]] = {}
    for p, text in zip(problems, texts, strict=True):
        steps = STEP_LINE.findall(text)
        for a, op, b, c in steps:
            total_arith += 1
            right_arith += OPERATIONS[op](int(a), int(b)) == int(c)
        for i, d in enumerate(decisions.get(str(p.id), [])):
            written = steps[i][1] if i < len(steps) else None
            outcome = ("right" if written == d["op"] else
                       "competitor" if d["competitor"] and written == d["competitor"] else "other")
            counts = kinds.setdefault(d["kind"], {"right": 0, "competitor": 0, "other": 0})
            counts[outcome] += 1
    return {"arithmetic_step_accuracy": right_arith / total_arith if total_arith else None,
            "steps_written": total_arith,
            "decisions_by_kind": {k: v | {"right_share": v["right"] / sum(v.values())}
                                  for k, v in sorted(kinds.items())}}


def ensure_built(settings: BuildSettings | None = None, progress: bool = True) -> Path:
    """The cached built-in model folder, built first if missing (what every command calls)."""
    settings = settings or BuildSettings()
    path = default_model_dir(settings)
    return path if is_built(path) else build(path, settings, progress)
