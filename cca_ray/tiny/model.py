"""The built-in model: a tiny Llama (grouped-query attention, head_dim 32 for vLLM's CPU
attention) and the loop that trains it on CPU with a fixed step count."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


@dataclass(frozen=True)
class TinySpec:
    """Architecture and training settings of the built-in model (part of its cache key)."""

    hidden_size: int = 128
    intermediate_size: int = 512
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    max_positions: int = 512
    steps: int = 3600  # ~11 min on 2 cores; measured 0.51 greedy test accuracy (seen)
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01


def make_model(spec: TinySpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama for this tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).float()


def _lr_at(step: int, spec: TinySpec) -> float:
    """Linear warmup then cosine decay to 0 (the annealing matters for accuracy)."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
          texts: list[str | tuple[str, str]],
          spec: TinySpec, seed: int, progress: bool = True) -> list[float]:
    """Train for spec.steps steps (EOS appended to each text); returns the loss curve."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    # A text is either a string (loss on every token) or (prompt, answer): loss on the answer
    # only, so the model spends its capacity on reasoning, not on guessing random names.
    encoded, starts = [], []
    for t in texts:
        prompt, answer = t if isinstance(t, tuple) else ("", t)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        a_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        encoded.append(p_ids + a_ids)
        starts.append(len(p_ids))
    too_long = [len(e) for e in encoded if len(e) > spec.max_positions]
    if too_long:
        raise ValueError(f"{len(too_long)} training texts exceed {spec.max_positions} tokens "
                         f"(longest {max(too_long)}); shorten them or raise max_positions")
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95),
                                  weight_decay=spec.weight_decay)
    pad = tokenizer.pad_token_id
    order: list[list[int]] = []
    losses = []
    model.train()
    bar = tqdm(range(spec.steps), desc="training tiny model", unit="step", disable=not progress)
    for step in bar:
        if not order:  # length buckets: 16 batches' worth sorted by length, less padding
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            chunk = spec.batch_size * 16
            batches = []
            for start in range(0, len(fresh) - spec.batch_size + 1, chunk):
                group = sorted(fresh[start : start + chunk], key=lambda i: len(encoded[i]))
                batches += [group[j : j + spec.batch_size]
                            for j in range(0, len(group) - spec.batch_size + 1, spec.batch_size)]
            rng.shuffle(batches)
            order = batches
        rows = order.pop()
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, i in enumerate(rows):
            seq = encoded[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, starts[i] : len(seq)] = ids[row, starts[i] : len(seq)]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return losses
