"""Local lm-eval tasks: JSONL data beside YAML task files that point at it by absolute path, so
lm-eval runs them offline (``TaskManager(include_path=...)``). The built-in world's suites and
the real models' fact suites are both written here, in the same three shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cca_ray.io import write_jsonl

COMMON = {"dataset_path": "json", "test_split": "test", "num_fewshot": 0}
ACCURACY = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]


def choice_task(doc_to_text: str, doc_to_choice: str, doc_to_target: str | int) -> dict[str, Any]:
    """A multiple-choice task scored by the log-likelihood of each option's text (accuracy)."""
    return {"output_type": "multiple_choice", "doc_to_text": doc_to_text,
            "doc_to_choice": doc_to_choice, "doc_to_target": doc_to_target,
            "metric_list": [dict(m) for m in ACCURACY]}


def short_answer_task(doc_to_text: str) -> dict[str, Any]:
    """A short greedy generation (up to a newline or full stop) scored by exact match with the
    row's ``answer``, ignoring case and punctuation."""
    return {
        "output_type": "generate_until",
        "doc_to_text": doc_to_text,
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n", "."], "do_sample": False, "max_gen_toks": 8},
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                     {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": True}],
    }


# TruthfulQA's mc1 layout: the true answer first among mc1_targets.choices
TRUTHFUL_MC1 = choice_task("Question: {{question}}\nAnswer:", "{{mc1_targets.choices}}", 0)


def write_local_tasks(out_dir: str | Path, rows: dict[str, list[dict]],
                      specs: dict[str, dict[str, Any]]) -> Path:
    """Each task's rows as out_dir/tasks/<name>.jsonl and its spec as <name>.yaml (absolute data
    path, so the YAMLs must be rewritten when the folder moves); returns the tasks folder."""
    tasks = Path(out_dir).resolve() / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name, task_rows in rows.items():
        write_jsonl(task_rows, tasks / f"{name}.jsonl")
    for name, spec in specs.items():
        body = {"task": name, **COMMON, **spec,
                "dataset_kwargs": {"data_files": {"test": str(tasks / f"{name}.jsonl")}}}
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return tasks
