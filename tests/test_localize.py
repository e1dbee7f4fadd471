"""Localisation: the prefix method, and the branching variants (naive scan, batched scan, bisect)
on a scripted completion table (exactness with non-monotone outcomes) and on a real tiny model."""

from __future__ import annotations

from collections import Counter

import pytest

from cca_ray.localize import Pivot, localize, prefix_method, split_pivots
from cca_ray.sampling.base import Completion
from cca_ray.sampling.traces import Trace
from cca_ray.tiny.tokenizer import train_tokenizer

WORDS = "zero one two three four five six seven eight nine The final answer is ."


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([WORDS + " 0 1 2 3 4 5 6 7 8 9"])


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _trace(tok, greedy: str, contrast: str | None, gold: float, greedy_ok: bool) -> Trace:
    prompt = "Q: one"
    t = Trace("t1", 0, gold, prompt, _ids(tok, prompt), _ids(tok, greedy), greedy, greedy_ok)
    if contrast is not None:
        t.contrast_ids, t.contrast_text, t.contrast_correct = _ids(tok, contrast), contrast, not greedy_ok
    return t


def test_prefix_method_takes_the_first_differing_token(tok):
    t = _trace(tok, " one two The final answer is 3 .", " one two The final answer is 4 .", 4.0, False)
    loc = prefix_method([t, _trace(tok, " two", None, 2.0, True)], tok)
    assert loc.dropped == Counter({"no contrasting sample": 1})
    (p,) = loc.pivots
    k = p.position
    assert t.greedy_ids[:k] == t.contrast_ids[:k] and t.greedy_ids[k] != t.contrast_ids[k]
    assert p.prefix["token_ids"] == t.prompt_ids + t.greedy_ids[:k]
    assert tok.decode([p.desired_token]) == "4" and tok.decode([p.undesired_token]) == "3"
    assert p.prefix["text"].startswith("Q: one") and p.method == "prefix"


def test_prefix_method_swaps_roles_when_greedy_is_right(tok):
    t = _trace(tok, " answer is 3 .", " answer is 4 .", 3.0, True)
    (p,) = prefix_method([t], tok).pivots
    assert tok.decode([p.desired_token]) == "3" and tok.decode([p.undesired_token]) == "4"


class ScriptedSampler:
    """Our Sampler interface over a table: completing prompt + y[:k] yields a fixed continuation,
    so the branching algorithms can be checked against a known first flip."""

    def __init__(self, tok, trace: Trace, outcome: list[bool], gold: float):
        self.tokenizer, self.trace, self.outcome, self.gold = tok, trace, outcome, gold
        self.calls = 0

    def generate_ids(self, prompt_ids, n=1, temperature=0.0, seed=0, desc="", max_new_tokens=None,
                     prefix_texts=None):
        out = []
        for ids in prompt_ids:
            k = len(ids) - len(self.trace.prompt_ids)
            answer = self.gold if self.outcome[k] else self.gold + 1
            text = f" nine The final answer is {int(answer)} ."
            out.append([Completion(text, _ids(self.tokenizer, text))])
        self.calls += len(prompt_ids)
        return out


def _scripted(tok, flips: list[int], length: int = 12):
    """A trace of `length` sampled tokens whose completion at k is correct iff k in flips-set
    (greedy, k=0, is wrong; the sample itself, k=length, is right)."""
    y = " ".join(["two"] * length)
    t = _trace(tok, " three The final answer is 1 .", " " + y, 5.0, False)
    t.contrast_text = " " + y
    outcome = [k in flips or k == length for k in range(length + 1)]
    return t, outcome


@pytest.mark.parametrize("flips", [[5], [3, 4, 9, 10], [1], [11], [7, 2]])
def test_naive_and_batched_find_the_same_first_flip(tok, flips):
    t, outcome = _scripted(tok, flips)
    found = {}
    for method in ("branching", "branching-batched"):
        s = ScriptedSampler(tok, t, outcome, 5.0)
        loc = localize(method, [t], s, chunk=4, progress=False)
        (p,) = loc.pivots
        found[method] = p.position
        assert p.desired_token == t.contrast_ids[p.position]  # the flip leads to a right answer
        greedy_next = t.greedy_ids[0] if p.position == 0 else _ids(tok, " nine")[0]
        assert p.undesired_token == greedy_next  # the greedy next token after the prefix
        assert p.undesired_token != p.desired_token
        assert loc.completions == s.calls
    assert found["branching"] == found["branching-batched"] == min(flips) - 1


def test_bisect_finds_a_flip_with_fewer_completions(tok):
    t, outcome = _scripted(tok, list(range(30, 41)), length=40)  # monotone: right from k=30 on
    naive = ScriptedSampler(tok, t, outcome, 5.0)
    bis = ScriptedSampler(tok, t, outcome, 5.0)
    (p_naive,) = localize("branching", [t], naive, progress=False).pivots
    (p_bis,) = localize("branching-bisect", [t], bis, progress=False).pivots
    assert p_bis.position == p_naive.position == 29
    assert bis.calls < naive.calls / 2


def test_bisect_boundary_is_a_real_flip_when_outcomes_are_not_monotone(tok):
    t, outcome = _scripted(tok, [3, 20, 21], length=30)
    s = ScriptedSampler(tok, t, outcome, 5.0)
    (p,) = localize("branching-bisect", [t], s, progress=False).pivots
    k = p.position + 1
    assert outcome[k] and not outcome[k - 1]  # adjacent: unflipped before, flipped at the pivot


def test_unknown_method_and_missing_sampler_are_refused(tok):
    t, _ = _scripted(tok, [2])
    with pytest.raises(ValueError, match="choose one of"):
        localize("magic", [t], tokenizer=tok)
    with pytest.raises(ValueError, match="needs a sampler"):
        localize("branching", [t], tokenizer=tok)


def test_branching_on_a_real_model_naive_equals_batched(small_model):
    """Real HF completions: greedy vs a sampled trace with a gold set to the sample's answer
    (so the two traces disagree in correctness); naive and batched scans agree exactly and the
    bisect pivot is adjacent to a real flip."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cca_ray.data.answers import extract_answer
    from cca_ray.data.prompts import build_prompt
    from cca_ray.sampling import make_sampler
    from cca_ray.sampling.traces import prompt_token_ids

    tok = AutoTokenizer.from_pretrained(small_model)
    model = AutoModelForCausalLM.from_pretrained(small_model).eval()
    sampler = make_sampler("hf", model=model, tokenizer=tok, batch_size=16, max_new_tokens=24,
                           progress=False)
    questions = ["Ana has 5 apples. She buys 3 more apples.", "A box holds 6 pencils.",
                 "The first box has 4 oranges.", "Tom reads 7 pages a day for 2 days."]
    prompts = [build_prompt(q, 0) for q in questions]
    ids = prompt_token_ids(tok, prompts)
    greedy = sampler.generate_ids(ids)
    samples = sampler.generate_ids(ids, n=8, temperature=1.5, seed=0)
    traces = []
    for prompt, pids, g, ss in zip(prompts, ids, greedy, samples, strict=True):
        g_ans = extract_answer(g[0].text)
        c = next((c for c in ss if extract_answer(c.text) not in (None, g_ans)), None)
        if c is None:
            continue
        t = Trace("q", len(traces), extract_answer(c.text), prompt, pids, g[0].token_ids, g[0].text, False,
                  c.token_ids, c.text, True, 0)
        traces.append(t)
    assert traces, "the small model should give at least one sample with another answer"
    naive = localize("branching", traces, sampler, progress=False)
    batched = localize("branching-batched", traces, sampler, chunk=4, progress=False)
    bisect = localize("branching-bisect", traces, sampler, progress=False)
    key = lambda loc: [(p.instance_id, p.position, p.desired_token, p.undesired_token)  # noqa: E731
                       for p in loc.pivots]
    assert key(naive) == key(batched) and naive.pivots
    assert batched.generated_tokens >= naive.generated_tokens  # batched completes past the flip
    assert bisect.completions <= naive.completions + 2 * len(traces)


def _pivots(n: int) -> list[Pivot]:
    return [Pivot(i % 3, i, "prefix", {"text": "", "token_ids": [1, i]}, 2, 3, 0, False) for i in range(n)]


@pytest.mark.parametrize(("n", "fraction", "held"), [(20, 0.2, 4), (7, 0.2, 1), (3, 0.9, 2), (1, 0.5, 0),
                                                     (20, 0.0, 0)])
def test_split_pivots_is_disjoint_seeded_and_keeps_order(n, fraction, held):
    pivots = _pivots(n)
    train, heldout = split_pivots(pivots, fraction, seed=0)
    assert len(heldout) == held and len(train) == n - held
    assert {p.instance_id for p in train}.isdisjoint({p.instance_id for p in heldout})
    assert sorted(p.instance_id for p in train + heldout) == list(range(n))
    assert [p.instance_id for p in train] == sorted(p.instance_id for p in train)  # input order kept
    again = split_pivots(pivots, fraction, seed=0)
    assert again == (train, heldout)
    if 0 < held < n - 1:  # another seed draws another held-out set
        seeds = {tuple(p.instance_id for p in split_pivots(pivots, fraction, seed=s)[1]) for s in range(5)}
        assert len(seeds) > 1


def test_pivot_kinds_tells_operation_signs_from_digits_and_the_rest(small_model):
    from transformers import AutoTokenizer

    from cca_ray.localize import pivot_kinds

    tok = AutoTokenizer.from_pretrained(small_model)

    def pivot(a: str, b: str) -> Pivot:
        ids = [tok.convert_tokens_to_ids(t) for t in (a, b)]
        assert tok.unk_token_id not in ids, (a, b)
        return Pivot("w01", 0, "prefix", {"text": "", "token_ids": [1]}, ids[0], ids[1], 0, False)

    kinds = pivot_kinds([pivot("+", "-"), pivot("-", "+"), pivot("*", "+"), pivot("3", "4"),
                         pivot("+", "3")], tok)
    assert kinds == {"operation": 3, "arithmetic": 1, "other": 1}
