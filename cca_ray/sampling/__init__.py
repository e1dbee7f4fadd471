"""Trace generation behind one small interface; the HF backend here, vLLM alongside (issue 4)."""

from cca_ray.sampling.hf import HFSampler

__all__ = ["HFSampler"]
