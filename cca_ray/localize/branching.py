"""Branching method: walk along the sampled trace y; the first k whose greedy completion of
y_1..y_k flips the greedy trace's correctness makes y_k the pivotal token. Three exact or
near-exact ways to find it: a naive scan (one completion per position, in order), a batched
scan (chunks of positions completed together; identical result, fewer rounds) and bisection
(binary search for a flip, then the two neighbours checked)."""

from __future__ import annotations

from tqdm import tqdm

from cca_ray.data.answers import is_correct
from cca_ray.localize.pivots import Localization, make_pivot, usable
from cca_ray.sampling.base import cut_at_stop
from cca_ray.sampling.traces import Trace


class _Branches:
    """Greedy completions of prompt + y[:k], memoised per (trace, k), with token accounting."""

    def __init__(self, sampler, traces: list[Trace], max_new_tokens: int | None, loc: Localization):
        self.sampler, self.traces, self.max_new_tokens, self.loc = sampler, traces, max_new_tokens, loc
        self.memo: dict[tuple[int, int], tuple[bool, int | None]] = {}
        tok = sampler.tokenizer
        self.y_text = [[tok.decode(t.contrast_ids[:k]) for k in range(len(t.contrast_ids) + 1)]
                       for t in traces]

    def known(self, i: int, k: int) -> tuple[bool, int | None] | None:
        """k = 0 is the greedy trace itself; k = len(y) is y itself (it already ends)."""
        t = self.traces[i]
        if k == 0:
            return t.greedy_correct, (t.greedy_ids[0] if t.greedy_ids else None)
        if k == len(t.contrast_ids):
            return bool(t.contrast_correct), None
        return self.memo.get((i, k))

    def outcomes(self, wanted: list[tuple[int, int]]) -> None:
        """Complete every (trace, k) not yet known, in one sampler call."""
        todo = sorted({w for w in wanted if self.known(*w) is None})
        if not todo:
            return
        ids = [self.traces[i].prompt_ids + self.traces[i].contrast_ids[:k] for i, k in todo]
        texts = [self.y_text[i][k] for i, k in todo]
        outs = self.sampler.generate_ids(ids, desc="branch completions", prefix_texts=texts,
                                         max_new_tokens=self.max_new_tokens)
        for (i, k), out in zip(todo, outs, strict=True):
            c = out[0]
            full, _ = cut_at_stop(self.y_text[i][k] + c.text)
            self.memo[(i, k)] = (is_correct(full, self.traces[i].gold),
                                 c.token_ids[0] if c.token_ids else None)
            self.loc.generated_tokens += len(c.token_ids)
            self.loc.completions += 1

    def flipped(self, i: int, k: int) -> bool:
        return self.known(i, k)[0] != self.traces[i].greedy_correct

    def pivot(self, i: int, k: int, method: str):
        """Pivot for a flip at k (k-1 not flipped): y_k against the greedy next token after y[:k-1]."""
        t = self.traces[i]
        y = t.contrast_ids
        greedy_next = self.known(i, k - 1)[1]
        if greedy_next is None:
            self.loc.dropped["no greedy next token before the flip"] += 1
            return None
        if greedy_next == y[k - 1]:
            self.loc.dropped["flip token equals the greedy token (numerical tie)"] += 1
            return None
        flipped_correct = self.known(i, k)[0]
        return make_pivot(t, method, k - 1, y[: k - 1], y[k - 1], greedy_next, flipped_correct,
                          self.sampler.tokenizer)


def branching(sampler, traces: list[Trace], method: str = "branching", max_new_tokens: int | None = None,
              chunk: int = 8, progress: bool = True) -> Localization:
    """Run one of the branching variants over all traces with a contrasting sample."""
    loc = Localization([], method)
    kept = usable(traces, loc.dropped)
    br = _Branches(sampler, kept, max_new_tokens, loc)
    first_flip = {"branching": _naive, "branching-batched": _batched, "branching-bisect": _bisect}[method]
    for i, k in enumerate(first_flip(br, chunk, progress)):
        if k is None:
            loc.dropped["no flip along the sampled trace"] += 1
            continue
        p = br.pivot(i, k, method)
        if p is not None:
            loc.pivots.append(p)
    return loc


def _naive(br: _Branches, chunk: int, progress: bool) -> list[int | None]:
    """One completion per position, trace by trace, in order, until the first flip."""
    found: list[int | None] = []
    for i, t in enumerate(tqdm(br.traces, desc="branching (naive scan)", disable=not progress)):
        k_found = None
        for k in range(1, len(t.contrast_ids) + 1):
            br.outcomes([(i, k)])
            if br.flipped(i, k):
                k_found = k
                break
        found.append(k_found)
    return found


def _batched(br: _Branches, chunk: int, progress: bool) -> list[int | None]:
    """The same first flip, found by completing `chunk` positions of every open trace at once."""
    found: list[int | None] = [None] * len(br.traces)
    open_ = set(range(len(br.traces)))
    start = 1
    bar = tqdm(total=len(open_), desc="branching (batched)", disable=not progress)
    while open_:
        wanted = [(i, k) for i in sorted(open_)
                  for k in range(start, min(start + chunk, len(br.traces[i].contrast_ids) + 1))]
        br.outcomes(wanted)
        for i in sorted(open_):
            n = len(br.traces[i].contrast_ids)
            hit = next((k for k in range(start, min(start + chunk, n + 1)) if br.flipped(i, k)), None)
            if hit is not None or start + chunk > n:
                found[i] = hit
                open_.discard(i)
                bar.update(1)
        start += chunk
    bar.close()
    return found


def _bisect(br: _Branches, chunk: int, progress: bool) -> list[int | None]:
    """Binary search for adjacent positions (k-1 unflipped, k flipped) between k=0 (greedy) and
    k=len(y) (the sample itself, flipped by construction), all traces in lockstep; then the two
    neighbours of the pivot (k-1 and k) are confirmed by their own completions."""
    lo = [0] * len(br.traces)
    hi = [len(t.contrast_ids) for t in br.traces]
    found: list[int | None] = [None] * len(br.traces)
    if any(not br.flipped(i, hi[i]) for i in range(len(br.traces))):
        raise AssertionError("a contrasting trace must differ from greedy in correctness")
    rounds = 0
    while True:
        mids = [(i, (lo[i] + hi[i]) // 2) for i in range(len(br.traces)) if hi[i] - lo[i] > 1]
        if not mids:
            break
        rounds += 1
        br.outcomes(mids)
        for i, m in mids:
            if br.flipped(i, m):
                hi[i] = m
            else:
                lo[i] = m
    br.outcomes([(i, k) for i in range(len(br.traces)) for k in (lo[i], hi[i])])
    for i in range(len(br.traces)):
        if hi[i] == lo[i] + 1 and br.flipped(i, hi[i]) and not br.flipped(i, lo[i]):
            found[i] = hi[i]
    return found
