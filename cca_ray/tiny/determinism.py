"""Reproducible CPU training: pin the ISA-dependent code paths (ATen's vectorised kernels, MKL BLAS,
oneDNN) and the thread count, in a freshly spawned process.

Measured here (AMD EPYC with AVX512): ATen's ISA alone changes every trained weight, so ATen runs
its AVX2 kernels (what any AVX2 machine picks). MKL's "AVX2,STRICT" branch pins MKL on Intel CPUs;
AMD CPUs ignore it and run MKL's AUTO branch, so an Intel and an AMD machine can still differ in
MKL's matmuls. MKL_CBWR=COMPATIBLE would pin those too, at about 1.9x the CPU time per training
step (measured), which breaks the build's time budget: the shipped model was built as below."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Read once when torch / MKL / oneDNN load, so they must be in the environment before `import torch`.
DETERMINISTIC_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's own SIMD kernels (softmax, reductions, AdamW, ...)
    # MKL's conditional numerical reproducibility: the AVX2 branch on Intel; AMD runs AUTO (see above)
    "MKL_CBWR": "AVX2,STRICT",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # belt and braces: no AVX512 MKL kernels should CBWR be ignored
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN kernels (unused by fp32 training today; cheap insurance)
    "DNNL_MAX_CPU_ISA": "AVX2",  # the same for oneDNN releases that read the old name
    "MKL_DYNAMIC": "FALSE",  # MKL may not pick fewer threads than asked
    # no numerical effect: idle OpenMP threads sleep instead of spinning, so a build sharing its
    # cores with other work slows down in proportion instead of collapsing (measured 7-10x)
    "OMP_WAIT_POLICY": "PASSIVE",
}


def deterministic_env(threads: int, spin: bool = False) -> dict[str, str]:
    """DETERMINISTIC_ENV plus a fixed thread count for OpenMP and MKL (results depend on it). ``spin``:
    idle OpenMP threads spin (no numerical effect; 1.4x faster circuits training, measured), right only
    for a job that has its cores to itself."""
    env = {**DETERMINISTIC_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return {**env, "OMP_WAIT_POLICY": "ACTIVE"} if spin else env


def _child(fn: Callable[..., Any], args: tuple, threads: int, conn: Any) -> None:
    """Spawned-process entry: pin torch's threads and algorithms, run fn, send back (ok, value)."""
    try:
        import torch

        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        result = (True, fn(*args))
    except BaseException:  # every failure, KeyboardInterrupt included, goes back to the parent
        result = (False, traceback.format_exc())
    try:
        # Plain pickle copies tensors; the pipe's own pickler would pass torch storages as file
        # descriptors that die with this process.
        conn.send_bytes(pickle.dumps(result))
    finally:
        conn.close()


def run_deterministic(fn: Callable[..., T], *args: Any, threads: int,
                      env: dict[str, str] | None = None) -> T:
    """fn(*args) in a fresh spawned process with deterministic_env(threads) (env replaces it, for
    comparisons); a failure in the child raises RuntimeError carrying the child's traceback."""
    env = deterministic_env(threads) if env is None else env
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # a spawned child copies the parent's environment when it starts
    try:
        process = ctx.Process(target=_child, args=(fn, args, threads, send), daemon=True)
        process.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    send.close()
    try:
        ok, value = pickle.loads(receive.recv_bytes())  # before join: a big result blocks the child
    except EOFError:
        process.join()
        code = process.exitcode
        raise RuntimeError(f"deterministic child died without a result (exit code {code})") from None
    process.join()
    if not ok:
        raise RuntimeError(f"deterministic child failed:\n{value}")
    return value
