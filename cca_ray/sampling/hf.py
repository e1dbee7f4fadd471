"""HF transformers backend: batched, left-padded greedy and seeded sampling that stops at the
first complete answer sentence (or at 'Q:' / EOS), with a progress bar."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from cca_ray.data.answers import STOP_SENTENCE


@dataclass
class Completion:
    text: str
    token_ids: list[int]


def cut_at_stop(text: str) -> tuple[str, bool]:
    """The text up to the stop point, and whether a stop point was found."""
    match = STOP_SENTENCE.search(text)
    q = text.find("\nQ:")
    ends = [e for e in (match.end() if match else -1, q) if e >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


class HFSampler:
    """Generates completions with a causal LM held in memory."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_new_tokens: int = 256,
                 progress: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token for batched generation")

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int = 1, temperature: float = 0.0,
                 seed: int = 0, desc: str = "generating") -> list[list[Completion]]:
        """n completions per prompt; temperature 0 means greedy (then n must be 1)."""
        if temperature == 0 and n != 1:
            raise ValueError("greedy decoding gives one completion per prompt (n=1)")
        flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        out: list[list[Completion]] = [[] for _ in prompts]
        generator = torch.Generator().manual_seed(seed)
        for start in tqdm(range(0, len(flat), self.batch_size), desc=desc, unit="batch",
                          disable=not self.progress):
            chunk = flat[start : start + self.batch_size]
            for (i, _), completion in zip(chunk, self._batch([p for _, p in chunk], temperature,
                                                             generator), strict=True):
                out[i].append(completion)
        return out

    def _batch(self, prompts: list[str], temperature: float, generator) -> list[Completion]:
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        tok.padding_side = old_side
        ids, mask = enc["input_ids"], enc["attention_mask"]
        past = None
        generated = torch.empty((len(prompts), 0), dtype=torch.long)
        done = torch.zeros(len(prompts), dtype=torch.bool)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        step_ids, step_pos = ids, positions
        for _ in range(self.max_new_tokens):
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                             past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                next_ids = logits.argmax(-1)
            next_ids = next_ids.masked_fill(done, tok.pad_token_id)
            generated = torch.cat([generated, next_ids[:, None]], dim=1)
            done |= next_ids == tok.eos_token_id
            for row in torch.nonzero(~done).flatten().tolist():
                tail = tok.decode(generated[row, -12:], skip_special_tokens=True)
                if "." in tail or "Q" in tail:
                    if cut_at_stop(tok.decode(generated[row], skip_special_tokens=True))[1]:
                        done[row] = True
            if done.all():
                break
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=mask.dtype)], dim=1)
            step_ids = next_ids[:, None]
            step_pos = step_pos[:, -1:] + 1
        completions = []
        for row in range(len(prompts)):
            token_ids = [t for t in generated[row].tolist()
                         if t not in (tok.pad_token_id, tok.eos_token_id)]
            text, _ = cut_at_stop(tok.decode(token_ids, skip_special_tokens=True))
            completions.append(Completion(text=text, token_ids=token_ids))
        return completions
