"""Evaluation: GSym accuracy (macro over templates), lm-eval general suite, paired tests."""

from cca_ray.evaluate.general import general_deltas, general_scores
from cca_ray.evaluate.gsym import accuracy_report, greedy_correct
from cca_ray.evaluate.stats import mcnemar_p

__all__ = ["accuracy_report", "general_deltas", "general_scores", "greedy_correct", "mcnemar_p"]
