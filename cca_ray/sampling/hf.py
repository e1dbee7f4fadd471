"""HF transformers backend: batched, left-padded greedy and seeded sampling that stops at the
first complete answer sentence (or at 'Q:' / EOS), with a progress bar."""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from cca_ray.sampling.base import (
    CONTEXT_TOKENS,
    Completion,
    check_request,
    cut_at_stop,
    decode_continuation,
    encode_prompts,
    eos_ids,
    make_completion,
)

__all__ = ["Completion", "HFSampler", "cut_at_stop"]

# Generated tokens decoded at each step to decide whether a full stop-rule check is worth it.
_TAIL = 12


class HFSampler:
    """Generates completions with a causal LM held in memory."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, max_new_tokens: int = 256,
                 progress: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        self.stop_ids = eos_ids(tokenizer, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.stop_ids, default=0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[str], n: int = 1, temperature: float = 0.0, seed: int = 0,
                 desc: str = "generating", max_new_tokens: int | None = None) -> list[list[Completion]]:
        """n completions per prompt; temperature 0 means greedy (then n must be 1)."""
        return self.generate_ids(encode_prompts(self.tokenizer, prompts), n=n, temperature=temperature,
                                 seed=seed, desc=desc, max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], n: int = 1, temperature: float = 0.0,
                     seed: int = 0, desc: str = "generating", max_new_tokens: int | None = None,
                     prefix_texts: list[str] | None = None) -> list[list[Completion]]:
        """n completions per tokenised prompt; the stop rule sees prefix_texts[i] + generated."""
        prefixes = check_request(len(prompt_ids), n, temperature, prefix_texts)
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        out: list[list[Completion]] = [[] for _ in prompt_ids]
        # A prefix that already holds a stop point leaves nothing to generate.
        stopped = [cut_at_stop(p)[1] for p in prefixes]
        for i in range(len(prompt_ids)):
            if stopped[i]:
                out[i] = [Completion(text="", token_ids=[]) for _ in range(n)]
        flat = [i for i in range(len(prompt_ids)) if not stopped[i] for _ in range(n)]
        # Longest first, so each batch pads little; the order is fixed, so seeded runs repeat.
        flat.sort(key=lambda i: -len(prompt_ids[i]))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for start in tqdm(range(0, len(flat), self.batch_size), desc=desc, unit="batch",
                          disable=not self.progress):
            chunk = flat[start : start + self.batch_size]
            done = self._batch([prompt_ids[i] for i in chunk], [prefixes[i] for i in chunk],
                               temperature, generator, limit)
            for i, completion in zip(chunk, done, strict=True):
                out[i].append(completion)
        return out

    def _batch(self, prompts: list[list[int]], prefixes: list[str], temperature: float,
               generator: torch.Generator, limit: int) -> list[Completion]:
        """One left-padded batch, decoded step by step with a KV cache until every row stops."""
        tok, device, rows = self.tokenizer, self.device, len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        stop_ids = torch.tensor(sorted(self.stop_ids), device=device, dtype=torch.long)
        contexts = [list(p[-CONTEXT_TOKENS:]) for p in prompts]
        lengths: list[int | None] = [None] * rows  # generated ids kept per row, once it stops
        past = None
        generated = torch.empty((rows, 0), dtype=torch.long, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        step_ids, step_pos = ids, (mask.cumsum(-1) - 1).clamp(min=0)
        for _ in range(limit):
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                             past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                next_ids = logits.argmax(-1)
            next_ids = next_ids.masked_fill(done, self.pad_id)
            generated = torch.cat([generated, next_ids[:, None]], dim=1)
            step = generated.shape[1]
            hit_eos = torch.isin(next_ids, stop_ids) & ~done
            for row in torch.nonzero(hit_eos).flatten().tolist():
                lengths[row] = step - 1  # EOS itself is not part of the completion
            done |= hit_eos
            for row in torch.nonzero(~done).flatten().tolist():
                tail = tok.decode(generated[row, -_TAIL:].tolist(), skip_special_tokens=True)
                if "." in tail or "Q" in tail:
                    text = decode_continuation(tok, generated[row].tolist(), contexts[row])
                    if cut_at_stop(prefixes[row] + text)[1]:
                        done[row], lengths[row] = True, step
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
            step_ids = next_ids[:, None]
            step_pos = step_pos[:, -1:] + 1
        kept = [generated[row, : lengths[row]].tolist() if lengths[row] is not None
                else generated[row].tolist() for row in range(rows)]
        return [make_completion(tok, kept[row], prefixes[row], contexts[row]) for row in range(rows)]

    def close(self) -> None:
        """Drop this sampler's reference to the model (the caller's own references keep it alive)
        and return cached GPU memory."""
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
