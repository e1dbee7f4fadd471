"""Targeted update of the selected rows, the random-component control, and the sparse delta."""

from cca_ray.update.delta import apply_delta, apply_delta_to, load_delta, save_delta
from cca_ray.update.rows import RowDeltas, merge_rows, selected_rows
from cca_ray.update.train import UpdateError, UpdateResult, targeted_update, validation_steps

__all__ = ["RowDeltas", "UpdateError", "UpdateResult", "apply_delta", "apply_delta_to", "load_delta",
           "merge_rows", "save_delta", "selected_rows", "targeted_update", "validation_steps"]
