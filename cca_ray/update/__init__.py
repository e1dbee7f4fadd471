"""Targeted update of the selected rows, the random-component control, and the sparse delta; every update
runs the one keep-best loop (`loop.keep_best`) and returns a `TrainResult`."""

from cca_ray.update.delta import apply_delta, apply_delta_to, load_delta, save_delta
from cca_ray.update.loop import TrainResult, UpdateError, keep_best, schedule
from cca_ray.update.rows import RowDeltas, merge_rows, selected_rows
from cca_ray.update.train import targeted_update

__all__ = ["RowDeltas", "TrainResult", "UpdateError", "apply_delta", "apply_delta_to", "keep_best",
           "load_delta", "merge_rows", "save_delta", "schedule", "selected_rows", "targeted_update"]
