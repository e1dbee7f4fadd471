"""DeepSpeed ZeRO (stage 0-3, world size 1, fp32) for the updates: the process setup, the engine config,
gathering and restoring the model (shared with full fine-tuning), and the targeted update inside an engine:
the same loss, steps and validation as `targeted_update`, training the model's real weights with a gradient
mask on the selected rows, so a Ray TrainerActor can run it; the model is restored after."""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from cca_ray.dcm.batches import Example
from cca_ray.sampling.weights import Rows, WeightUpdate
from cca_ray.update.loop import TrainResult, keep_best, schedule
from cca_ray.update.train import check_inputs, logit_loss, micro_batches


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def deepspeed_env(backend: str | None = None) -> dict[str, str]:
    """Set the single-process rendezvous variables DeepSpeed needs (only those not already set)."""
    wanted = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
              "MASTER_ADDR": "127.0.0.1"}
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            wanted["MASTER_PORT"] = str(s.getsockname()[1])
    if (backend or _default_backend()) == "gloo":
        wanted["DS_ACCELERATOR"] = "cpu"
    # DeepSpeed JIT-builds its CPU comm op (slowly) into torch's extension cache; one cache per
    # environment, or two venvs sharing ~/.cache/torch_extensions rebuild it back and forth
    wanted["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    return added


def init_distributed(backend: str | None = None) -> None:
    """deepspeed.init_distributed once per process ("gloo" on CPU, "nccl" on GPU by default); a process
    group that someone else started (Ray Train, torchrun) is adopted as it is."""
    backend = backend or _default_backend()
    deepspeed_env(backend)
    import deepspeed  # after deepspeed_env: DeepSpeed picks its accelerator on import

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    # DeepSpeed 0.19 calls c10d functions that torch 2.13 deprecates, a warning per ZeRO-3 gather
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)


def ds_config(zero_stage: int, micro_batch_size: int, accumulation: int) -> dict:
    """The DeepSpeed config of a world-size-1 fp32 run at ``zero_stage`` (no clipping: callers add it)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation,
        "gradient_clipping": 0.0,
        # every parameter partitioned under ZeRO-3 (none kept whole for being small), and no
        # process-wide swap of torch.nn.functional.linear (ZeRO-3's default) that would outlive the update
        "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0,
                              "memory_efficient_linear": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def gathered(params: list[torch.nn.Parameter], zero_stage: int) -> AbstractContextManager:
    """The full parameters, readable inside the block (gathered under ZeRO-3)."""
    if zero_stage < 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


@contextmanager
def restored(model, rows: dict[str, torch.Tensor], base_rows: dict[str, torch.Tensor]) -> Iterator[None]:
    """On exit, undo what deepspeed.initialize did to the model (the engine's forward hooks, ZeRO-3's
    partitioned parameters and the attributes it adds, ZeRO-1/2's flat buffers behind the trained
    weights), freeze every parameter and put the base rows back: a plain, unchanged model again."""
    modules = {m: set(vars(m)) for m in model.modules()}
    hooks = {m: {h: set(getattr(m, h)) for h in _HOOKS} for m in model.modules()}
    params = {p: (n, set(vars(p))) for n, p in model.named_parameters()}
    try:
        yield
    finally:
        for m, keys in modules.items():
            if hasattr(m, "_original_parameters"):  # ZeRO-3 swapped in a dict that gathers on access
                m._parameters = m._original_parameters
            for key in set(vars(m)) - keys:
                delattr(m, key)
            for h, ids in hooks[m].items():  # destroy() leaves the engine's own forward hooks behind
                for i in set(getattr(m, h)) - ids:
                    del getattr(m, h)[i]
        for p, (name, keys) in params.items():
            if hasattr(p, "ds_id") or name in rows:  # one parameter at a time: a fresh full tensor
                with gathered([p], 3 if hasattr(p, "ds_id") else 0):
                    data = p.data.clone()
                for key in set(vars(p)) - keys:
                    delattr(p, key)
                p.data = data
            p.grad = None
            p.requires_grad_(False)
            if name in rows:
                with torch.no_grad():
                    p[rows[name]] = base_rows[name]


class _Rows:
    """The trained parameters, their selected rows and base values: deltas and full weights."""

    def __init__(self, model, rows: dict[str, torch.Tensor], zero_stage: int):
        named = dict(model.named_parameters())
        self.params = [named[n] for n in rows]
        self.rows = {n: r.to(named[n].device) for n, r in rows.items()}
        self.zero_stage = zero_stage
        with torch.no_grad():
            self.base = {n: named[n][r].clone() for n, r in self.rows.items()}

    def parameter_count(self) -> int:
        """Entries in the selected rows (what the deltas hold)."""
        return sum(b.numel() for b in self.base.values())

    def mask_gradients(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Trainable, with a hook that zeroes every gradient row but the selected ones."""
        handles = []
        for p, r in zip(self.params, self.rows.values(), strict=True):
            keep = torch.zeros(p.shape[0], 1, dtype=torch.bool, device=p.device)
            keep[r] = True
            p.requires_grad_(True)
            handles.append(p.register_hook(lambda g, keep=keep: torch.where(keep, g, 0.0)))
        return handles

    def deltas(self) -> list[torch.Tensor]:
        """Current weights[rows] - base weights[rows], in rows order."""
        with gathered(self.params, self.zero_stage), torch.no_grad():
            return [p[r] - self.base[n] for (n, r), p in zip(self.rows.items(), self.params, strict=True)]

    def weights(self, deltas: list[torch.Tensor]) -> dict[str, Rows]:
        """Name -> the selected rows' new values, base + delta (what merge_rows writes): all a weight
        sync needs, so no full weight is gathered for it."""
        return {name: Rows(r.cpu(), (self.base[name] + d).detach().cpu())
                for (name, r), d in zip(self.rows.items(), deltas, strict=True)}


def zero_targeted_update(model, rows: dict[str, torch.Tensor], examples: list[Example], pad_id: int,
                         validate: Callable[[WeightUpdate], float], lr: float = 1e-4,
                         steps: int = 50, optimizer: str = "sgd", micro_batch_size: int = 8,
                         zero_stage: int = 2, progress: bool = True,
                         desc: str = "update") -> TrainResult[list[torch.Tensor]]:
    """`targeted_update` on ``model``'s own weights inside a DeepSpeed ZeRO engine (world size 1, fp32).

    Only the parameters in ``rows`` train, and a gradient hook zeroes all but their selected rows.
    ``validate(weights)`` gets, for every parameter in ``rows``, its selected rows (`Rows`, CPU) as
    ``merge_rows`` builds them from the current deltas (base + (current - base) on the rows), so the best
    step's score belongs to exactly the model that ``merge_rows(base, rows, result.best)`` exports (the
    live weights can differ from that by one ulp where an entry moved by more than half its size).
    ``model`` should sit on DeepSpeed's device already; it holds the base weights again (bit for bit,
    all frozen, no DeepSpeed state left) when this returns or raises.
    """
    check_inputs(examples, sum(len(r) for r in rows.values()))
    init_distributed()
    import deepspeed

    start = time.perf_counter()
    micro = micro_batches(examples, micro_batch_size)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = _Rows(model, rows, zero_stage)
    engine = None
    try:
        with restored(model, trained.rows, trained.base):
            handles = trained.mask_gradients()
            try:
                opt = (torch.optim.Adam(trained.params, lr=lr) if optimizer == "adam"
                       else torch.optim.SGD(trained.params, lr=lr, momentum=0.0, weight_decay=0.0))
                engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=trained.params,
                                                  config=ds_config(zero_stage, micro_batch_size, len(micro)))

                def step_loss(step: int) -> float:
                    total = 0.0
                    for i, batch in enumerate(micro):
                        loss = logit_loss(engine, batch, pad_id, len(examples))
                        engine.backward(loss, scale_wrt_gas=False)  # micro-batch losses add up to the loss
                        total += loss.item()
                        if i < len(micro) - 1:
                            engine.step()  # only counts the micro-batch (gradient accumulation)
                    return total

                # engine.step() after the last micro-batch steps the optimizer
                result = keep_best(step_loss, engine.step, validate, trained.deltas, trained.weights, steps,
                                   schedule(steps), lr=lr, trainable_parameters=trained.parameter_count(),
                                   progress=progress, desc=desc)
            finally:
                for h in handles:
                    h.remove()
                if engine is not None:
                    engine.destroy()
    finally:
        engine = None
        gc.collect()  # the engine's __del__ runs now, not in the middle of the caller's next update
    result.seconds = time.perf_counter() - start
    return result
