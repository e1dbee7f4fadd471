"""The targeted update under DeepSpeed ZeRO (stage 0-3, world size 1, fp32): the same loss, steps and
validation as `targeted_update`, but training the model's real weights with a gradient mask on the
selected rows, so a Ray TrainerActor can run it inside a DeepSpeed engine; the model is restored after."""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from tqdm import tqdm

from cca_ray.dcm.batches import Example, full_logits, logit_difference
from cca_ray.update.train import UpdateError, UpdateResult, micro_batches, validation_steps

log = logging.getLogger("cca_ray")


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
    # DeepSpeed JIT-builds its CPU comm op (about 100 s here) into torch's extension cache; one cache per
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


def _ds_config(zero_stage: int, micro_batch_size: int, accumulation: int) -> dict:
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


def _gathered(params: list[torch.nn.Parameter], zero_stage: int):
    """The full parameters, readable inside the block (gathered under ZeRO-3)."""
    if zero_stage < 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


@contextmanager
def _restored(model, rows: dict[str, torch.Tensor], base_rows: dict[str, torch.Tensor]):
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
                with _gathered([p], 3 if hasattr(p, "ds_id") else 0):
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
        with _gathered(self.params, self.zero_stage), torch.no_grad():
            return [p[r] - self.base[n] for (n, r), p in zip(self.rows.items(), self.params, strict=True)]

    def weights(self, deltas: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Name -> CPU copy of the full weight with base + delta on the rows (what merge_rows builds)."""
        out = {}
        with _gathered(self.params, self.zero_stage), torch.no_grad():
            for (name, r), p, d in zip(self.rows.items(), self.params, deltas, strict=True):
                w = p.detach().clone()
                w[r] = self.base[name] + d
                out[name] = w.cpu()
        return out


def zero_targeted_update(model, rows: dict[str, torch.Tensor], examples: list[Example], pad_id: int,
                         validate: Callable[[dict[str, torch.Tensor]], float], lr: float = 1e-4,
                         steps: int = 50, optimizer: str = "sgd", micro_batch_size: int = 8,
                         zero_stage: int = 2, progress: bool = True, desc: str = "update") -> UpdateResult:
    """`targeted_update` on ``model``'s own weights inside a DeepSpeed ZeRO engine (world size 1, fp32).

    Only the parameters in ``rows`` train, and a gradient hook zeroes all but their selected rows.
    ``validate(weights)`` gets, for every parameter in ``rows``, a CPU copy of its full weight as
    ``merge_rows`` builds it from the current deltas (base + (current - base) on the rows), so the best
    step's score belongs to exactly the model that ``merge_rows(base, rows, best_deltas)`` exports (the
    live weights can differ from that by one ulp where an entry moved by more than half its size).
    ``model`` should sit on DeepSpeed's device already; it holds the base weights again (bit for bit,
    all frozen, no DeepSpeed state left) when this returns or raises.
    """
    if not examples:
        raise UpdateError("the update got no localisation examples")
    if sum(len(r) for r in rows.values()) == 0:
        raise UpdateError("no weight rows selected for the update: check update.kinds against the mask")
    init_distributed()
    import deepspeed

    start = time.perf_counter()
    micro = micro_batches(examples, micro_batch_size)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = _Rows(model, rows, zero_stage)
    engine = None
    try:
        with _restored(model, trained.rows, trained.base):
            handles = trained.mask_gradients()
            try:
                opt = (torch.optim.Adam(trained.params, lr=lr) if optimizer == "adam"
                       else torch.optim.SGD(trained.params, lr=lr, momentum=0.0, weight_decay=0.0))
                engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=trained.params,
                                                  config=_ds_config(zero_stage, micro_batch_size, len(micro)))
                best = _train(engine, trained, micro, len(examples), pad_id, validate, lr, steps,
                              progress, desc)
            finally:
                for h in handles:
                    h.remove()
                if engine is not None:
                    engine.destroy()
    finally:
        engine = None
        gc.collect()  # the engine's __del__ runs now, not in the middle of the caller's next update
    best.seconds = time.perf_counter() - start
    return best


def _train(engine, trained: _Rows, micro: list[list[Example]], n_examples: int, pad_id: int,
           validate: Callable[[dict[str, torch.Tensor]], float], lr: float, steps: int, progress: bool,
           desc: str) -> UpdateResult:
    """The loop of `targeted_update`, with the engine doing backward and the optimizer step."""
    checks = set(validation_steps(steps))
    current = trained.deltas()
    best_val = validate(trained.weights(current))
    best = UpdateResult(0, best_val, current, trainable_parameters=sum(d.numel() for d in current))
    best.history.append({"step": 0, "val_accuracy": best_val, "loss": None})
    bar = tqdm(range(1, steps + 1), desc=desc, unit="step", disable=not progress)
    for step in bar:
        total = 0.0
        for i, batch in enumerate(micro):
            loss = -logit_difference(full_logits(engine, batch, pad_id), batch).sum() / n_examples
            engine.backward(loss, scale_wrt_gas=False)  # the micro-batch losses add up to the loss
            total += loss.item()
            if i == len(micro) - 1 and not torch.isfinite(torch.tensor(total)):
                raise UpdateError(f"update loss is {total} at step {step} (lr {lr}): lower update.lr; "
                                  f"the best step so far was {best.best_step}")
            engine.step()  # steps the optimizer after the last micro-batch (gradient accumulation)
        record = {"step": step, "loss": total}
        if step in checks:
            current = trained.deltas()
            record["val_accuracy"] = validate(trained.weights(current))
            best.observe(step, record["val_accuracy"], lambda current=current: current)
            bar.set_postfix(loss=f"{total:.3f}", val=f"{record['val_accuracy']:.3f}")
            log.info("%s step %d: loss %.4f, val accuracy %.4f", desc, step, total, record["val_accuracy"])
        best.history.append(record)
    best.last_deltas = trained.deltas()
    return best
