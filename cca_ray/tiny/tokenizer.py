"""The built-in world's tokenizer: word-level, one token per digit, trained with `tokenizers`
on the project's corpus and wrapped as a PreTrainedTokenizerFast.

Spaces are kept as a '▁' mark on the following word (Metaspace) and newlines are tokens of
their own, so decode(encode(text)) == text exactly: the answer extractor sees what the model
wrote ("123", not "1 2 3").
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def train_tokenizer(texts: Iterable[str], min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word, punctuation mark and digit of the corpus."""
    raw = Tokenizer(models.WordLevel(unk_token=SPECIAL["unk"]))
    raw.normalizer = normalizers.Replace(Regex(r"[ \t]+"), " ")
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[^\w▁\s]"), behavior="isolated"),
    ])
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.WordLevelTrainer(
        special_tokens=[SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"]],
        min_frequency=min_frequency,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token=SPECIAL["pad"], bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"], padding_side="left", clean_up_tokenization_spaces=False,
    )
