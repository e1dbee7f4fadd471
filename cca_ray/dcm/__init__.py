"""DCM: a sparse mask over attention heads (Q/K/V) and MLP neurons that promotes the desired token."""

from cca_ray.dcm.batches import Example, PrefixCache, full_logits, left_pad, logit_difference
from cca_ray.dcm.train import DCMError, DCMResult, learn_mask, selected_components

__all__ = ["DCMError", "DCMResult", "Example", "PrefixCache", "full_logits", "learn_mask", "left_pad",
           "logit_difference", "selected_components"]
