"""Tests of the circuits data: corpus generator, BPE tokenizer, task minimal pairs and task loss."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from cca_ray.circuits.corpus import generate_corpus
from cca_ray.circuits.tasks import (
    CANDIDATES,
    TASKS,
    binary_logit,
    make_task,
    task_accuracy,
    task_loss,
)
from cca_ray.circuits.tokenizer import (
    EOT,
    encode_docs,
    load_tokenizer,
    save_tokenizer,
    single_token,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def docs():
    return generate_corpus(3000, 0)


@pytest.fixture(scope="module")
def tok(docs):
    return train_tokenizer(docs, 512)


def test_corpus_is_deterministic_and_depends_on_the_seed():
    assert generate_corpus(50, 3) == generate_corpus(50, 3)
    assert generate_corpus(50, 3) != generate_corpus(50, 4)
    assert len(generate_corpus(7, 0)) == 7


def test_corpus_is_short_ascii_and_holds_every_task_decision(docs):
    text = "".join(docs)
    assert text.isascii() and all(d.endswith("\n") for d in docs)
    assert max(map(len, docs)) <= 160
    for decision in ("while True:", "return True\n", ".add(", " += ", "]]", '"', "'", " = set()"):
        assert text.count(decision) >= 100, decision
    # the decisions are determined: no other continuation ever occurs
    assert text.count("while True") == text.count("while True:")
    assert text.count("return True") == text.count("return True\n")
    assert "[[[" not in text and "]]]" not in text
    for line in text.splitlines():
        for run in re.findall(r"\[+", line):  # every opened depth is closed by the same run
            assert "]" * len(run) in line
        assert re.fullmatch(r"[^\"']*((\"[a-z ]*\"|'[a-z ]*')[^\"']*)*", line), line
    for doc in docs:
        for name in re.findall(r"(\w+) = set\(\)", doc):
            assert f"{name} +=" not in doc
        for name in re.findall(r"(\w+) = (?:\"\"|'')", doc):
            assert f"{name}." not in doc and f"{name} += " in doc


def test_tokenizer_round_trips_and_keeps_task_tokens_whole(docs, tok):
    assert tok.token_to_id(EOT) == 0
    assert all(tok.decode(tok.encode(d).ids) == d for d in docs)
    held_out = generate_corpus(300, 99)
    assert all(tok.decode(tok.encode(d).ids) == d for d in held_out)
    for a, b in CANDIDATES.values():
        assert single_token(tok, a) != single_token(tok, b)
    assert tok.encode("x = [[1, 2]]").tokens[-1] == "]]"
    assert tok.encode('s = "a b"').tokens[-1] == '"'
    assert tok.encode("    out += w").tokens[:3] == ["    ", "out", " +="]
    lengths = [len(e.ids) for e in tok.encode_batch(docs)]
    assert max(lengths) < 64 and sum(lengths) / len(lengths) < 40


def test_encode_docs_prefixes_each_doc_with_eot(tok):
    stream = encode_docs(tok, ["x = 1\n", "print(x)\n"])
    assert stream.dtype == torch.long and stream.dim() == 1
    ids = stream.tolist()
    assert ids[0] == 0 and ids.count(0) == 2
    second = ids.index(0, 1)
    assert tok.decode(ids[1:second]) == "x = 1\n" and tok.decode(ids[second + 1:]) == "print(x)\n"


def test_save_and_load_round_trip(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    save_tokenizer(tok, path)
    again = load_tokenizer(path)
    text = "def f(xs):\n    seen = set()\n    return True\n"
    assert again.encode(text).ids == tok.encode(text).ids
    assert again.decode(again.encode(text).ids) == text
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]


def test_single_token_rejects_a_multi_token_text(tok):
    assert tok.id_to_token(single_token(tok, "]]")) == "]]"
    with pytest.raises(ValueError, match="single token.*larger vocab_size"):
        single_token(tok, "while True:")


def test_unknown_task_names_the_tasks(tok):
    with pytest.raises(ValueError, match="bracket_counting") as err:
        make_task("nope", tok, 2, 0)
    assert all(t in str(err.value) for t in TASKS)


# what the differing tokens of a pair decode to: (row 2i, row 2i+1), stripped of spaces
DIFFERENCE = {
    "single_double_quote": ({'"'}, {"'"}),
    "bracket_counting": ({"[["}, {"["}),
    "set_or_string": ({"set()"}, {'""', "''"}),
    "while_return_true": ({"while"}, {"return"}),
}


@pytest.mark.parametrize("name", TASKS)
def test_minimal_pairs(tok, name):
    b = make_task(name, tok, 100, seed=1, max_len=64)
    assert len(b) == 200 and b.tokens.shape[1] <= 64 and b.name == name
    assert (b.tokens[:, 0] == 0).all()
    assert b.label.tolist() == [1.0, -1.0] * 100
    assert (b.correct[0::2] == b.token_a).all() and (b.correct[1::2] == b.token_b).all()
    assert (b.alternative[0::2] == b.token_b).all() and (b.alternative[1::2] == b.token_a).all()
    a_text, b_text = CANDIDATES[name]
    assert tok.decode([b.token_a]) == a_text and tok.decode([b.token_b]) == b_text
    seen_mid = set()
    for i in range(0, len(b), 2):
        r0 = b.tokens[i, 1:b.last[i] + 1].tolist()
        r1 = b.tokens[i + 1, 1:b.last[i + 1] + 1].tolist()
        assert (b.tokens[i, b.last[i] + 1:] == 0).all()
        p = 0
        while r0[p] == r1[p]:
            p += 1
        s = 0
        while r0[-1 - s] == r1[-1 - s]:
            s += 1
        assert s >= 1  # the scored token itself is shared
        mid0, mid1 = tok.decode(r0[p:len(r0) - s]).strip(), tok.decode(r1[p:len(r1) - s]).strip()
        assert mid0 in DIFFERENCE[name][0] and mid1 in DIFFERENCE[name][1], (mid0, mid1)
        if name != "set_or_string":
            assert len(r0) == len(r1) and sum(x != y for x, y in zip(r0, r1, strict=True)) == 1
        seen_mid.add(mid1)
        for row, ctx in ((i, r0), (i + 1, r1)):
            text = tok.decode(ctx)
            correct = tok.decode([int(b.correct[row])])
            # the correct token continues the context as the tokenizer would split the whole text
            assert tok.encode(text + correct).ids == ctx + [int(b.correct[row])]
            if name == "single_double_quote":
                opening = re.findall(r"[\"']", text)[-1]
                assert correct == opening
            if name == "bracket_counting":
                assert correct == "]" * (len(re.findall(r"\[+", text)[-1]))
    assert len(seen_mid) == len(DIFFERENCE[name][1])  # every variant occurs


@pytest.mark.parametrize("name", ["single_double_quote", "bracket_counting"])
def test_without_distractors_no_closed_string_or_list_precedes_the_decision(tok, name):
    """The harder variant (make_task's default; the config's is distractors: false) puts closed
    strings and lists before about a quarter of the decisions; without distractors none: every
    quote or bracket is in the decision's own line."""
    def before_decision(b):
        texts = [tok.decode(b.tokens[i, 1:b.last[i] + 1].tolist()) for i in range(len(b))]
        return [t[:t.rstrip("\n").rfind("\n") + 1] for t in texts]  # the lines before the last

    marks = re.compile(r"[\"'\[\]]")
    hard = before_decision(make_task(name, tok, 100, seed=1))
    clean = make_task(name, tok, 100, seed=1, distractors=False)
    assert sum(bool(marks.search(t)) for t in hard) > 20
    assert not any(marks.search(t) for t in before_decision(clean))
    assert any(t for t in before_decision(clean))  # unrelated statements still come first sometimes


def test_opening_tokens_keep_a_calls_opening_quote_apart_from_the_closing_one(docs):
    plain, opening = train_tokenizer(docs, 512), train_tokenizer(docs, 512, opening_tokens=True)
    text = 'print("apples")\nname = \'pears\'\n'
    assert opening.decode(opening.encode(text).ids) == text
    assert '("' not in plain.encode(text).tokens  # the plain tokenizer: `(` then the quote token
    tokens = opening.encode(text).tokens
    assert '("' in tokens and '"' in tokens[tokens.index('("') + 1:]  # opens with `("`, closes with `"`
    b = make_task("single_double_quote", opening, 50, seed=1)
    heads = {opening.id_to_token(int(t)) for t in b.tokens.flatten()}
    assert {'("', "('"} & heads  # the print(...) pairs now differ in the opening token
    assert opening.decode([b.token_a]) == '"' and opening.decode([b.token_b]) == "'"


def test_make_task_is_deterministic(tok):
    one, two = make_task("set_or_string", tok, 20, 5), make_task("set_or_string", tok, 20, 5)
    assert torch.equal(one.tokens, two.tokens) and torch.equal(one.last, two.last)
    assert not torch.equal(one.tokens, make_task("set_or_string", tok, 20, 6).tokens)


def test_task_loss_is_two_way_cross_entropy(tok):
    b = make_task("bracket_counting", tok, 8, 0)
    logits = torch.randn(len(b), tok.get_vocab_size(), generator=torch.Generator().manual_seed(0))
    rows = torch.arange(len(b))
    pair = torch.stack([logits[rows, b.correct], logits[rows, b.alternative]], 1)
    expected = -torch.log_softmax(pair, 1)[:, 0].mean()
    torch.testing.assert_close(task_loss(logits, b), expected)
    torch.testing.assert_close(binary_logit(logits, b), logits[:, b.token_a] - logits[:, b.token_b])
    # scale and shift act on logit(A) - logit(B) whatever the row's answer
    d = logits[:, b.token_a] - logits[:, b.token_b]
    want = torch.nn.functional.softplus(-b.label * (2.5 * d - 0.7)).mean()
    torch.testing.assert_close(task_loss(logits, b, scale=2.5, shift=-0.7), want)
    zero = torch.zeros_like(logits)
    a_rows = replace(b, label=b.label[0::2], correct=b.correct[0::2], alternative=b.alternative[0::2])
    assert float(task_loss(zero[0::2], a_rows, shift=8.0)) < 1e-3  # shift towards A helps A rows
    b_rows = replace(b, label=b.label[1::2], correct=b.correct[1::2], alternative=b.alternative[1::2])
    assert float(task_loss(zero[1::2], b_rows, shift=8.0)) > 7.9


def test_task_accuracy(tok):
    b = make_task("while_return_true", tok, 4, 0)
    logits = torch.zeros(len(b), tok.get_vocab_size())
    logits[torch.arange(len(b)), b.correct] = 1.0
    assert task_accuracy(logits, b) == 1.0
    assert task_accuracy(-logits, b) == 0.0
    logits[0::2] = 0.0
    logits[0::2, b.token_b] = 1.0
    assert task_accuracy(logits, b) == 0.5
