"""Small BPE tokenizer for the circuits corpus, with a GPT-2-like pre-tokenizer: a space attaches to
the token after it, quotes and newlines stand alone, bracket and operator runs stay whole, so
every task's candidate (`"`, `'`, `]]`, `]`, `.`, ` +=`, `:`, newline) is one token.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from cca_ray.io import write_text

EOT = "<|endoftext|>"

# Pre-tokens, first match wins: newline; an indentation run (2+ spaces); then, each with an
# optional leading space: a word, a number, ONE quote, a `[` run; a `]` run; an operator run; a run
# of other punctuation; any other whitespace character.
_OPS = r"+\-*/%=<>!&|^~"
PATTERN = (r"\n| {2,}| ?[A-Za-z_][A-Za-z_0-9]*| ?[0-9]+| ?[\"']| ?\[+|\]+"
           rf"| ?[{_OPS}]+| ?[^\sA-Za-z0-9_\"'\[\]{_OPS}]+|\s")
ALPHABET = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
# the bracket task's candidate, added as a token if BPE did not learn it (safe: `]`-runs never take a
# leading space and the corpus has no `]]]`)
CLOSE2 = "]]"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(PATTERN), behavior="isolated")


OPENING = ('("', "('")  # a call's opening quote, as its own token with `opening_tokens`


def train_tokenizer(texts: Iterable[str], vocab_size: int, opening_tokens: bool = False) -> Tokenizer:
    """A BPE tokenizer of `vocab_size` tokens (EOT = id 0) trained on `texts`; decode(encode(t)) == t.
    ``opening_tokens``: `("` and `('` become tokens of their own, so an opening quote inside a call
    is never the token that closes a string (with a space before it, it never was)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Fuse()  # tokens hold their literal spaces: decoding is concatenation
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=ALPHABET,
                                  show_progress=False)
    texts = list(texts)
    tok.train_from_iterator(texts, trainer)
    if len(tok.encode(CLOSE2).ids) != 1 and any(CLOSE2 in t for t in texts):
        tok.add_tokens([AddedToken(CLOSE2, normalized=False)])
    if opening_tokens:
        tok.add_tokens([AddedToken(t, normalized=False) for t in OPENING])
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write the tokenizer as JSON atomically (temp file + rename), so a crash leaves no partial file."""
    write_text(tok.to_str(), path)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer written by save_tokenizer."""
    return Tokenizer.from_str(Path(path).read_text())


def encode_docs(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """All docs as one 1-D LongTensor token stream, each doc preceded by the EOT id (separator / BOS)."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.append(eot)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def single_token(tok: Tokenizer, text: str) -> int:
    """The id of `text`, which must encode to exactly one token (a task's candidate)."""
    enc = tok.encode(text, add_special_tokens=False)
    if len(enc.ids) != 1:
        raise ValueError(f"{text!r} must be a single token but tokenizes to {enc.tokens!r}; train the "
                         f"tokenizer with a larger vocab_size or on more corpus documents")
    return enc.ids[0]
