"""Prompt-lookup speculative decoding (issue #31): greedy answers identical to plain decoding, sampled tokens
from the same distribution, drafts found where the answer copies, and the limits (max_tokens, stops) kept."""

from __future__ import annotations

import pytest
import torch

from ernie45.engine import LLM, SamplingParams
from ernie45.engine.batcher import BatchEngine
from ernie45.engine.speculative import SpeculativeConfig, accept, ngram_draft

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PROMPTS = [
    "Who are you?",
    "Copy this: red star, blue circle, red star, blue circle, red star, blue circle, red star",
    "What is 23 plus 48?",
    "alpha beta gamma delta alpha beta gamma delta alpha beta gamma delta alpha beta",
]


def test_ngram_drafts_continue_the_latest_earlier_match():
    ids = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 7]
    assert ngram_draft(ids, 3, 1, 3) == [1, 2, 5]  # the latest [5, 6, 7] before the end is followed by 1, 2, 5
    assert ngram_draft(ids, 2, 2, 2) == [1, 2]
    assert ngram_draft([1, 2, 3, 4], 3, 1, 3) == []  # nothing repeats
    assert ngram_draft([4, 4, 4, 4], 2, 1, 3) == [4]  # the only earlier match ends one before the end


@pytest.fixture(scope="module")
def llms():
    plain = LLM()
    return plain, LLM(plain.model, processor=plain.processor, speculative_config=SPEC)


def test_greedy_answers_are_identical_to_plain_decoding_and_drafts_are_accepted(llms):
    plain, spec = llms
    params = SamplingParams(max_tokens=32, temperature=0)
    want = plain.generate(PROMPTS, params)
    got = spec.generate(PROMPTS, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    engine = BatchEngine(spec, max_batch=2, max_len=512, thread=False, speculative=spec.speculative)
    ids = spec.processor.tokenizer(PROMPTS[3], add_special_tokens=False)["input_ids"]
    handle = engine.submit({"input_ids": ids}, params)  # a completion that repeats itself: drafts from its answer
    while not handle.request.finished:
        engine.step()
    assert engine.stats["accepted_tokens"] > 0 and engine.stats["draft_tokens"] >= engine.stats["accepted_tokens"]
    assert engine.stats["steps"] < len(handle.request.row.token_ids) + 1  # fewer steps than tokens: it sped up
    short = SamplingParams(max_tokens=5, temperature=0)
    assert [len(g.token_ids) for g in spec.generate(PROMPTS, short)] == [len(w.token_ids) for w in
                                                                          plain.generate(PROMPTS, short)]  # fmt: skip
    stop = SamplingParams(max_tokens=32, temperature=0, stop=["circle"])
    assert [g.text for g in spec.generate(PROMPTS, stop)] == [w.text for w in plain.generate(PROMPTS, stop)]

    assert engine.stats["unspeculated_requests"] == 0
    penalised = SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3)
    handle = engine.submit({"input_ids": ids}, penalised)  # a row speculation cannot verify: said, not silent
    while not handle.request.finished:
        engine.step()
    assert handle.request.unspeculated == "penalties" and engine.stats["unspeculated_requests"] == 1


def test_sampled_tokens_keep_the_target_distribution():
    """accept() on fixed logits: the first token is distributed as p0 whatever the draft, and after an accepted
    draft the next as p1 — checked against the exact probabilities over 20,000 draws."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5) * 1.5
    p = logits.softmax(-1)

    class Req:  # what accept() reads of a request
        params = SamplingParams(temperature=1.0, max_tokens=4)
        generator = torch.Generator().manual_seed(1)

    n = 20_000
    first, second = torch.zeros(5), torch.zeros(5)
    unlikely = [int(p[0].argmin()), 2]  # most draws correct this draft
    for _ in range(n):
        first[accept(logits, unlikely, Req)[0]] += 1
    likely = [int(p[0].argmax()), 2]  # most draws accept it, then take the next token
    for _ in range(n // 2):
        out = accept(logits, likely, Req)
        if out[0] == likely[0]:
            second[out[1]] += 1
    assert (first / n - p[0]).abs().max() < 0.015, (first / n, p[0])
    assert second.sum() > 1000 and (second / second.sum() - p[1]).abs().max() < 0.04, (second, p[1])


def test_a_bad_speculative_config_is_refused_by_name():
    with pytest.raises(ValueError, match="'eagle'; choose from ngram, mtp, ernie_mtp"):
        SpeculativeConfig.parse({"method": "eagle"})
    with pytest.raises(ValueError, match="unknown keys \\['lookahead'\\]"):
        SpeculativeConfig.parse({"lookahead": 3})
    with pytest.raises(ValueError, match="prompt_lookup_max set the n-gram method; MTP does not read them"):
        SpeculativeConfig.parse({"method": "mtp", "prompt_lookup_max": 3})


def test_the_commands_take_speculation_and_answer_the_same(capsys):
    import subprocess
    import sys

    base = [sys.executable, "-m", "ernie45", "generate", PROMPTS[3], "--max-tokens", "24", "--temperature", "0"]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=600)
    fast = subprocess.run([*base, "--speculative", "4"], capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0 and fast.returncode == 0, fast.stderr[-2000:]
    assert fast.stdout == plain.stdout and plain.stdout.strip()
    chained = subprocess.run([*base, "--speculative", "mtp:3"], capture_output=True, text=True, timeout=600)
    assert chained.returncode == 0 and chained.stdout == plain.stdout, chained.stderr[-2000:]
    from ernie45.cli import main

    for value, said in (("40", "num_speculative_tokens is 1-16"), ("mtp:9", "MTP drafts 1-7 tokens a step"),
                        ("mtp:x", "'mtp' or 'mtp:K'")):  # fmt: skip
        # refused while the command line is read, before any model loads: the same parser, in this process
        with pytest.raises(SystemExit) as exit_:
            main(["generate", PROMPTS[3], "--speculative", value])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"--speculative: {value!r}" in err and said in err and "Traceback" not in err, err
