"""The sampling interface: the shared cut, the HF backend against transformers' own generate, a
scripted model for the stop rule, and the real vLLM CPU backend against the HF backend."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cca_ray.data.prompts import build_prompt
from cca_ray.sampling import Completion, HFSampler, Sampler, cut_at_stop, make_sampler
from cca_ray.sampling.base import make_completion

QUESTIONS = ("Ana has 5 apples. She buys 3 more apples.", "A box holds 6 pencils.",
             "The first box has 4 oranges.")
# Mixed lengths: full prompts and short fragments, so batches are really left-padded.
PROMPTS = [build_prompt(q, 0) for q in QUESTIONS] + ["Q: A box holds 6", "The capital of", "The answer is"]
PREFIXES = ["The answer is 5", "", "The final answer is 1", "x\n", "", "answer is 3."]
MAX_NEW = 24


@pytest.fixture(scope="module")
def tok(small_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(small_model)


@pytest.fixture(scope="module")
def random_model(small_model, tmp_path_factory) -> Path:
    """An untrained model with the small model's tokenizer: the trained 40-step model repeats one
    token, while large random weights give varied greedy text, a sharper backend comparison."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(small_model)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = tmp_path_factory.mktemp("random") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(small_model).save_pretrained(out)
    return out


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_cut(tok, ids: list[int], prefix: str = "") -> list[int]:
    """Reference cut by linear scan: the shortest prefix of ids (EOS removed) whose decoding
    covers the stop point of prefix + text."""
    eos = tok.eos_token_id
    ids = ids[: ids.index(eos)] if eos in ids else ids
    cut, found = cut_at_stop(prefix + tok.decode(ids, skip_special_tokens=True))
    if not found:
        return ids
    want = cut[len(prefix):] if len(cut) > len(prefix) else ""
    return next(ids[:k] for k in range(len(ids) + 1)
                if tok.decode(ids[:k], skip_special_tokens=True).startswith(want))


def assert_cut_consistent(tok, completion: Completion, prefix: str = "") -> None:
    """text is the decoded ids up to the stop point, and no token could be dropped."""
    decoded = tok.decode(completion.token_ids, skip_special_tokens=True)
    assert decoded.startswith(completion.text), (decoded, completion.text)
    assert cut_at_stop(prefix + completion.text)[0] == prefix + completion.text or not completion.text
    if cut_at_stop(prefix + decoded)[1] and completion.token_ids:
        shorter = tok.decode(completion.token_ids[:-1], skip_special_tokens=True)
        assert len(shorter) < len(completion.text), (shorter, completion.text)


# --- the shared cut ------------------------------------------------------------------------------


def test_make_completion_cuts_text_and_ids_at_the_same_point(tok):
    ids = ids_of(tok, " so 3 + 4 = 7. The answer is 7. so Mary has more\nQ: How")
    c = make_completion(tok, ids)
    assert c.text == " so 3 + 4 = 7. The answer is 7."
    assert c.token_ids == ids_of(tok, " so 3 + 4 = 7. The answer is 7.")
    q = make_completion(tok, ids_of(tok, " so 3 + 4 = 7.\nQ: How"))
    assert q.text == " so 3 + 4 = 7." and tok.decode(q.token_ids).startswith(q.text)
    assert make_completion(tok, ids_of(tok, " Mary has more apples")).text == " Mary has more apples"
    decimal = make_completion(tok, ids_of(tok, " The answer is 3.5. Then"))
    assert decimal.text == " The answer is 3.5."


def test_make_completion_applies_the_stop_rule_across_the_prefix(tok):
    ids = ids_of(tok, "2. so more apples.")
    assert make_completion(tok, ids, prefix_text="The answer is 1").text == "2."
    assert make_completion(tok, ids, prefix_text="The answer is 1").token_ids == ids_of(tok, "2.")
    assert make_completion(tok, ids).text == "2. so more apples."
    assert make_completion(tok, ids_of(tok, "Q: How"), prefix_text="x\n") == Completion("", [])


def test_make_sampler_rejects_unknown_backends_and_explains_a_missing_vllm(monkeypatch):
    with pytest.raises(ValueError, match="hf, vllm"):
        make_sampler("tgi", "somewhere")
    from cca_ray.sampling.vllm_backend import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="`gpu` extra.*`cpu-vllm` extra"):
        import_vllm()


def test_importing_sampling_does_not_import_vllm():
    code = "import sys, cca_ray.sampling; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


# --- HF backend on a scripted model --------------------------------------------------------------


class ScriptedLM(torch.nn.Module):
    """Emits a fixed token script whatever the input, and counts its forward calls."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, **_):
        self.calls += 1
        step = past_key_values or 0
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=step + 1)


def test_hf_stops_at_the_answer_sentence_and_keeps_only_the_generated_part(tok):
    script = ids_of(tok, "2. so Mary has 7 apples. The answer is 7. so more apples") + [tok.eos_token_id]
    model = ScriptedLM(script, len(tok))
    sampler = HFSampler(model, tok, max_new_tokens=40, progress=False)
    prompt = [ids_of(tok, "Q: How many?\nA:")]
    out = sampler.generate_ids(prompt, prefix_texts=["The answer is 1"])[0][0]
    assert out == Completion("2.", ids_of(tok, "2."))
    assert model.calls == len(ids_of(tok, "2."))  # stopped as soon as the sentence was complete
    plain = sampler.generate_ids(prompt)[0][0]
    assert plain.text == "2. so Mary has 7 apples. The answer is 7."
    assert plain.token_ids == ids_of(tok, plain.text)
    done = sampler.generate_ids(prompt * 2, prefix_texts=["The answer is 4. And", "x\n"])
    assert done[0] == [Completion("", [])] and done[1][0].text == "2. so Mary has 7 apples. The answer is 7."


def test_hf_drops_eos_and_obeys_max_new_tokens(tok):
    script = ids_of(tok, " so Mary has") + [tok.eos_token_id, *ids_of(tok, " more")]
    sampler = HFSampler(ScriptedLM(script, len(tok)), tok, max_new_tokens=40, progress=False)
    out = sampler.generate(["Q: How many?"])[0][0]
    assert out == Completion(" so Mary has", ids_of(tok, " so Mary has"))
    assert len(sampler.generate(["Q: How many?"], max_new_tokens=2)[0][0].token_ids) == 2
    with pytest.raises(ValueError, match="n=1"):
        sampler.generate(["Q: How many?"], n=2)


# --- HF backend on real models -------------------------------------------------------------------


def test_hf_greedy_equals_transformers_generate_up_to_the_cut(random_model, small_model, tok):
    for path in (random_model, small_model):
        model = load(path)
        sampler = make_sampler("hf", model=model, tokenizer=tok, max_new_tokens=MAX_NEW, progress=False)
        assert isinstance(sampler, Sampler)
        outs = sampler.generate(PROMPTS)
        for prompt, (c,) in zip(PROMPTS, outs, strict=True):
            ids = torch.tensor([ids_of(tok, prompt)])
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                 do_sample=False)[0, ids.shape[1]:].tolist()
            assert c.token_ids == expected_cut(tok, ref), (prompt, c, ref)
            assert c.text == cut_at_stop(tok.decode(c.token_ids, skip_special_tokens=True))[0]
            assert_cut_consistent(tok, c)
    # the random model's greedy text is varied, so the comparison above is not trivially true
    assert len({t for (c,) in make_sampler("hf", random_model, progress=False, max_new_tokens=MAX_NEW)
                .generate(PROMPTS) for t in c.token_ids}) > 10


def test_hf_left_padded_batches_match_one_by_one(random_model, tok):
    model = load(random_model)
    batched = HFSampler(model, tok, batch_size=8, max_new_tokens=MAX_NEW, progress=False)
    single = HFSampler(model, tok, batch_size=1, max_new_tokens=MAX_NEW, progress=False)
    assert len({len(ids_of(tok, p)) for p in PROMPTS}) > 3
    assert batched.generate(PROMPTS) == [single.generate([p])[0] for p in PROMPTS]
    prompt_ids = [ids_of(tok, p) for p in PROMPTS]
    one_by_one = [single.generate_ids([i], prefix_texts=[x])[0]
                  for i, x in zip(prompt_ids, PREFIXES, strict=True)]
    assert batched.generate_ids(prompt_ids, prefix_texts=PREFIXES) == one_by_one


def test_hf_seeded_sampling_repeats_and_differs_across_seeds(small_model, tok):
    sampler = HFSampler(load(small_model), tok, batch_size=4, max_new_tokens=12, progress=False)
    a = sampler.generate(PROMPTS[:3], n=4, temperature=1.5, seed=1)
    assert [len(x) for x in a] == [4, 4, 4]
    assert a == sampler.generate(PROMPTS[:3], n=4, temperature=1.5, seed=1)
    assert a != sampler.generate(PROMPTS[:3], n=4, temperature=1.5, seed=2)
    assert len({c.text for c in a[0]}) > 1  # the n samples of one prompt are not copies
    for x in a:
        for c in x:
            assert_cut_consistent(tok, c)


def test_hf_prefix_texts_finish_an_answer_sentence(tok):
    """A prefix that opened an answer sentence stops the continuation at its first '.', one that
    did not changes nothing (a scripted model, so the text does not hang on a trained one)."""
    script = ids_of(tok, " 7 apples. so Mary has more apples") + [tok.eos_token_id]
    sampler = HFSampler(ScriptedLM(script, len(tok)), tok, max_new_tokens=MAX_NEW, progress=False)
    prompt = [ids_of(tok, PROMPTS[0])]
    plain = sampler.generate_ids(prompt)[0][0]
    assert plain.text == " 7 apples. so Mary has more apples", plain.text
    (opened,), (other,) = sampler.generate_ids(prompt * 2, prefix_texts=["The answer is 5", "Then 5"])
    assert opened.text == plain.text[: plain.text.index(".") + 1] == " 7 apples."
    assert opened.token_ids == plain.token_ids[: len(opened.token_ids)]
    assert len(opened.token_ids) < len(plain.token_ids)
    assert other == plain


# --- vLLM backend (real, CPU build, in a subprocess) ---------------------------------------------

VLLM_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from cca_ray.sampling import make_sampler

    def dump(outs):
        return [[[c.text, c.token_ids] for c in o] for o in outs]

    if __name__ == "__main__":
        job = json.loads(sys.argv[1])
        result = {}
        for name, path in job["models"].items():
            start = time.perf_counter()
            # the default max_model_len (2048) is beyond the tiny model's 512 positions: clamped
            sampler = make_sampler("vllm", path, max_new_tokens=job["max_new"], progress=False)
            ready = time.perf_counter()
            ids = [sampler.tokenizer(p, add_special_tokens=False)["input_ids"] for p in job["prompts"]]
            greedy = sampler.generate(job["prompts"])
            timed = time.perf_counter() - ready
            result[name] = {
                "greedy": dump(greedy),
                "greedy_ids": dump(sampler.generate_ids(ids, prefix_texts=job["prefixes"])),
                "sampled": dump(sampler.generate(job["prompts"], n=4, temperature=1.0, seed=7)),
                "sampled_again": dump(sampler.generate(job["prompts"], n=4, temperature=1.0, seed=7)),
                "sampled_other": dump(sampler.generate(job["prompts"], n=4, temperature=1.0, seed=8)),
                "startup_s": ready - start, "greedy_s": timed,
            }
            if name == "small":  # more prompt tokens than one scheduler step takes, seeded
                many = sampler.generate(job["long_prompts"], n=2, temperature=1.0, seed=1, max_new_tokens=4)
                result[name]["long_counts"] = [len(o) for o in many]
            sampler.close()
        print("RESULT" + json.dumps(result))
""")


@pytest.fixture(scope="module")
def vllm_outputs(random_model, small_model, tmp_path_factory) -> dict:
    pytest.importorskip("vllm", reason="needs the cpu-vllm (or gpu) extra")
    script = tmp_path_factory.mktemp("vllm") / "vllm_sampler.py"
    script.write_text(VLLM_SCRIPT)
    job = {"models": {"random": str(random_model), "small": str(small_model)}, "prompts": PROMPTS,
           "prefixes": PREFIXES, "max_new": MAX_NEW,
           "long_prompts": [build_prompt(f"Ana has {i} apples.", 2) for i in range(30)]}
    proc = subprocess.run([sys.executable, str(script), json.dumps(job)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def as_completions(rows: list) -> list[list[Completion]]:
    return [[Completion(text, ids) for text, ids in row] for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random", "small"])
def test_vllm_greedy_equals_hf_greedy(vllm_outputs, random_model, small_model, tok, name):
    path = {"random": random_model, "small": small_model}[name]
    hf = HFSampler(load(path), tok, batch_size=4, max_new_tokens=MAX_NEW, progress=False)
    start = time.perf_counter()
    hf_greedy = hf.generate(PROMPTS)
    hf_seconds = time.perf_counter() - start
    got = vllm_outputs[name]
    print(f"{name}: HF greedy {hf_seconds:.3f}s, vLLM greedy {got['greedy_s']:.3f}s "
          f"(vLLM startup {got['startup_s']:.1f}s)")
    assert as_completions(got["greedy"]) == hf_greedy
    prompt_ids = [ids_of(tok, p) for p in PROMPTS]
    assert as_completions(got["greedy_ids"]) == hf.generate_ids(prompt_ids, prefix_texts=PREFIXES)
    assert as_completions(got["greedy_ids"])[5] == [Completion("", [])]  # its prefix had stopped
    if "." in hf_greedy[0][0].text:  # the prefix "The answer is 5" ends at the first '.'
        assert as_completions(got["greedy_ids"])[0][0].text.count(".") == 1


@pytest.mark.slow
def test_vllm_cpu_seeded_sampling_survives_a_batch_beyond_one_scheduler_step(vllm_outputs, tok):
    """30 prompts of ~220 tokens exceed the 4096-token step: with chunked prefill on, vLLM-CPU died
    on seeded requests ('CPU Generator does not use offset')."""
    assert len(ids_of(tok, build_prompt("Ana has 1 apples.", 2))) * 30 > 4096
    assert vllm_outputs["small"]["long_counts"] == [2] * 30


@pytest.mark.slow
def test_vllm_sampling_gives_n_per_prompt_reproducibly(vllm_outputs, tok):
    for got in vllm_outputs.values():
        sampled = as_completions(got["sampled"])
        assert [len(x) for x in sampled] == [4] * len(PROMPTS)
        assert sampled == as_completions(got["sampled_again"])
        assert sampled != as_completions(got["sampled_other"])
        assert len({c.text for c in sampled[0]}) > 1
        for row in sampled:
            for c in row:
                assert_cut_consistent(tok, c)


def test_prompts_get_the_tokenizers_bos_once():
    """A tokenizer that adds BOS (as Gemma's does) gets it on plain prompts, and not twice on a
    chat-template text that already starts with it; the tiny tokenizer adds nothing."""
    from tokenizers.processors import TemplateProcessing

    from cca_ray.sampling.base import encode_prompts
    from cca_ray.sampling.traces import prompt_token_ids
    from cca_ray.tiny.tokenizer import train_tokenizer

    tok = train_tokenizer(["Q: How many apples ? A: 3"])
    plain = encode_prompts(tok, ["Q: How many apples ?"])[0]
    assert tok.bos_token_id not in plain
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, bos)])
    with_bos = encode_prompts(tok, ["Q: How many apples ?"])[0]
    assert with_bos[0] == bos and with_bos[1:] == plain
    chat = encode_prompts(tok, [f"{tok.bos_token}Q: How many apples ?"])[0]
    assert chat.count(bos) == 1
    assert prompt_token_ids(tok, ["Q: How many apples ?"]) == [with_bos]
