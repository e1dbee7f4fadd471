"""The paper's fine-tuning baselines: supervised fine-tuning on GSym-Train's reference answers
(prompt tokens masked out of the loss), on all parameters or through LoRA adapters (peft), with
AdamW, a cosine schedule, gradient-norm clipping and weight decay; validated like the targeted
update (step 0 included, best step kept)."""

from __future__ import annotations

import gc
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cca_ray.data.gsm_symbolic import Problem
from cca_ray.data.prompts import solution_to_cot
from cca_ray.sampling.base import encode_prompts
from cca_ray.sampling.weights import LowRank, WeightUpdate
from cca_ray.update.deepspeed import ds_config, gathered, init_distributed, restored
from cca_ray.update.loop import TrainResult, UpdateError, keep_best, schedule

log = logging.getLogger("cca_ray")

IGNORE = -100  # label of a token the loss skips (prompt and padding)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class SFTExample:
    ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens


def sft_examples(problems: list[Problem], prompt: Callable[[str], str], tokenizer,
                 max_length: int = 2048) -> list[SFTExample]:
    """Prompt (as every stage encodes it) + " " + the reference chain of thought + EOS; only the
    answer tokens carry labels. Examples longer than max_length are cut at the end."""
    prompts = encode_prompts(tokenizer, [prompt(p.question) for p in problems])
    out = []
    for p, prompt_ids in zip(problems, prompts, strict=True):
        target = tokenizer(f" {solution_to_cot(p.answer)}", add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            target = target + [tokenizer.eos_token_id]
        ids = (prompt_ids + target)[:max_length]
        labels = ([IGNORE] * len(prompt_ids) + target)[:max_length]
        if any(label != IGNORE for label in labels):
            out.append(SFTExample(ids, labels))
    return out


def collate(batch: list[SFTExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (IGNORE on padding)."""
    n = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the base lr: linear warmup, then cosine decay to 0 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _lora(model, r: int, alpha: int, dropout: float):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules=targets, bias="none"))


def _lora_modules(peft_model):
    """(base parameter name, LoRA-wrapped linear) for every adapted module of a peft model."""
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            yield name.replace("base_model.model.", "", 1) + ".weight", module


def _merged_lora_weights(peft_model) -> dict[str, torch.Tensor]:
    """Base parameter name -> W + scale * B A for every LoRA-wrapped linear (what export merges)."""
    with torch.no_grad():
        return {n: (m.base_layer.weight + m.get_delta_weight("default")).detach().cpu().clone()
                for n, m in _lora_modules(peft_model)}


def lora_update(peft_model) -> dict[str, LowRank]:
    """Base parameter name -> its LoRA product as it stands (a [r, in], b [out, r], scale): what a
    weight sync sends for a LoRA run instead of the merged weights (r x (in + out) numbers each)."""
    return {n: LowRank(m.lora_A["default"].weight.detach().cpu().clone(),
                       m.lora_B["default"].weight.detach().cpu().clone(), float(m.scaling["default"]))
            for n, m in _lora_modules(peft_model)}


def finetune(model, examples: list[SFTExample], pad_id: int,
             validate: Callable[[WeightUpdate], float], lora: bool = False, lr: float = 1e-5,
             steps: int = 100, batch_size: int = 8, weight_decay: float = 0.01, max_grad_norm: float = 1.0,
             warmup_fraction: float = 0.03, eval_every: int = 10, seed: int = 0, lora_r: int = 16,
             lora_alpha: int = 32, lora_dropout: float = 0.1, zero_stage: int | None = None,
             progress: bool = True, desc: str = "sft") -> TrainResult[dict[str, torch.Tensor]]:
    """Fine-tune on ``examples`` for ``steps`` optimizer steps; ``validate(weights)`` scores the
    model as it stands (weights: the changed parameters' current values; LoRA: its factors, as
    `LowRank`, so a weight sync sends r x (in + out) numbers per module) at step 0, every
    ``eval_every`` steps and at the end. The model is left holding its BASE weights; the snapshots
    are the changed weights (LoRA: merged; apply them with load_state_dict(strict=False)).

    ``lora``: train LoRA adapters (peft) instead of every parameter. ``zero_stage`` (full fine-tuning
    only): train inside a DeepSpeed ZeRO engine at that stage (world size 1; the TrainerActor's
    path): same AdamW, schedule and clipping, DeepSpeed doing backward, clipping and the step; the
    model holds no DeepSpeed state afterwards."""
    if zero_stage is not None and lora:
        raise ValueError("zero_stage applies to full fine-tuning only (LoRA trains in PyTorch)")
    if not examples:
        raise UpdateError("fine-tuning got no training examples")
    start = time.perf_counter()
    device = next(model.parameters()).device
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    net = _lora(model, lora_r, lora_alpha, lora_dropout) if lora else model
    if not lora:
        for p in model.parameters():
            p.requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, int(warmup_fraction * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    rng = random.Random(seed)

    engine = None
    pending: list[torch.Tensor] = []  # this step's loss, for backward once it is known to be finite

    def current() -> dict[str, torch.Tensor]:
        net.eval()
        if lora:
            return _merged_lora_weights(net)
        with gathered(list(model.parameters()), zero_stage or 0):  # full parameters under ZeRO-3
            return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}

    def batches():
        while True:
            order = list(range(len(examples)))
            rng.shuffle(order)
            for s in range(0, max(1, len(order) - batch_size + 1), batch_size):
                yield [examples[i] for i in order[s : s + batch_size]]

    it = batches()

    def loss(step: int) -> float:
        net.train()
        batch = collate(next(it), pad_id, device)
        pending[:] = [(engine if engine is not None else net)(**batch).loss]
        return pending[0].item()

    def advance() -> None:
        loss = pending.pop()
        if engine is not None:
            engine.backward(loss)
            engine.step()  # clips (gradient_clipping), steps AdamW and the cosine schedule
            return
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()

    try:
        if zero_stage is not None:
            engine = _zero_engine(model, opt, sched, zero_stage, batch_size, max_grad_norm)
            log.info("%s: training inside a DeepSpeed ZeRO-%d engine", desc, zero_stage)
        sync = (lambda _: lora_update(net)) if lora else (lambda weights: weights)  # LoRA: the factors
        result = keep_best(loss, advance, validate, current, sync, steps,
                           schedule(steps, eval_every), lr=lr,
                           trainable_parameters=sum(p.numel() for p in params), progress=progress,
                           desc=desc, what="fine-tuning", lr_name="the lr")
    finally:
        pending.clear()
        if lora:
            net.unload()  # the plain model back, adapters removed
        if engine is not None:
            _zero_cleanup(engine)
        restore_base(model, base)
    changed_only(result, base)
    result.seconds = time.perf_counter() - start
    return result


def _zero_engine(model, opt, sched, zero_stage: int, batch_size: int, max_grad_norm: float):
    """A DeepSpeed engine (world size 1, fp32) around the model, AdamW and the schedule; the
    model's pre-DeepSpeed state is recorded so _zero_cleanup can undo everything."""
    import deepspeed

    init_distributed()
    rows = {n: torch.arange(p.shape[0]) for n, p in model.named_parameters()}
    restorer = restored(model, rows, {n: p.detach().clone() for n, p in model.named_parameters()})
    restorer.__enter__()
    config = ds_config(zero_stage, batch_size, 1) | {"gradient_clipping": max_grad_norm}
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
    except BaseException:
        restorer.__exit__(None, None, None)
        raise
    engine._cca_restorer = restorer
    return engine


def _zero_cleanup(engine) -> None:
    """Destroy the engine and hand the model back free of DeepSpeed (hooks, partitions, buffers)."""
    try:
        engine.destroy()
    finally:
        engine._cca_restorer.__exit__(None, None, None)
        gc.collect()


def restore_base(model, base: dict[str, torch.Tensor]) -> None:
    """Write the saved base weights back, frozen and without gradients: the caller's model again."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(base[n])
            p.requires_grad_(False)
            p.grad = None
    model.eval()


def changed_only(result: TrainResult[dict[str, torch.Tensor]], base: dict[str, torch.Tensor]) -> None:
    """Keep in every snapshot only the weights that differ from the base (a snapshot that several fields
    share stays one object); count the entries the best snapshot changes."""
    kept: dict[int, dict[str, torch.Tensor]] = {}

    def changed(snap: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        if snap is None:
            return None
        if id(snap) not in kept:
            kept[id(snap)] = {n: w for n, w in snap.items() if not torch.equal(w, base[n].cpu())}
        return kept[id(snap)]

    result.best, result.best_updated, result.last = (changed(result.best), changed(result.best_updated),
                                                      changed(result.last))
    result.changed_parameters = sum(int((w != base[n].cpu()).sum()) for n, w in result.best.items())
