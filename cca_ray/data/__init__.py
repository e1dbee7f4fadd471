"""Data layer: GSM-Symbolic loading, the template engine, splits, the template filter,
prompts and answer checking."""

from cca_ray.data.answers import extract_answer, is_correct, macro_accuracy, parse_gold
from cca_ray.data.gsm_symbolic import DataError, Problem, load_hub, load_jsonl, write_problems
from cca_ray.data.prompts import build_prompt, gsm8k_cot_exemplars
from cca_ray.data.splits import Splits, split_problems, write_splits
from cca_ray.data.template_filter import select_templates, template_accuracies
from cca_ray.data.template_parsing import TemplateError, load_templates, parse_template
from cca_ray.data.templates import TemplateEngine

__all__ = [
    "DataError", "Problem", "Splits", "TemplateEngine", "TemplateError", "build_prompt",
    "extract_answer", "gsm8k_cot_exemplars", "is_correct", "load_hub", "load_jsonl",
    "load_templates", "macro_accuracy", "parse_gold", "parse_template", "select_templates",
    "split_problems", "template_accuracies", "write_problems", "write_splits",
]
