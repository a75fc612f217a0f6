"""Speculative decoding with n-gram drafts: the same tokens as without it.

Verification samples every position exactly as sequential decoding would, so
greedy requests must match transformers and seeded random requests must get
the very tokens (and logprobs) they get with speculation off, penalties,
min_tokens and logit_bias included, while drafts are both accepted and
rejected along the way.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from folio.cluster.entrypoints.llm import LLM
from folio.cluster.ngram import NgramIndex
from folio.protos.messages import SamplingParams
from tests.hf_reference import assert_greedy_parity, run_staggered
from tests.model_fixtures import repetitive_prompts


def _brute_force(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    """The latest earlier occurrence of the longest matching suffix, by scanning."""
    end = len(tokens)
    for n in range(min(hi, end - 1), lo - 1, -1):
        for e in range(end - 1, n - 1, -1):
            if tokens[e - n : e] == tokens[end - n : end]:
                return tokens[e : e + k]
    return []


def test_ngram_proposes_what_followed_the_latest_match():
    index = NgramIndex(1, 3)
    seq = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6]
    assert index.propose(seq, 3) == [7, 1, 2], "the latest '5 6' was followed by 7 1 2"
    assert index.propose(seq + [7], 4) == [1, 2, 5, 6], "'5 6 7' last ended before 1 2"
    assert NgramIndex(2, 3).propose([1, 2, 3, 4], 2) == [], "no repeated suffix, no guess"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=60),
    st.integers(1, 3),
    st.integers(0, 2),
    st.lists(st.integers(1, 6), min_size=1, max_size=8),
)
def test_incremental_index_agrees_with_a_scan(tokens, lo, extra, growth):
    """Grown a few tokens at a time, the index proposes what a full scan proposes."""
    hi = lo + extra
    index, end = NgramIndex(lo, hi), 1
    for g in growth + [len(tokens)]:
        end = min(len(tokens), end + g)
        assert index.propose(tokens[:end], 4) == _brute_force(tokens[:end], 4, lo, hi)


def _assert_drafts_both_ways(llm: LLM) -> None:
    stats = llm.scheduler.stats()
    assert stats.num_accepted_tokens > 0, "no draft was ever accepted"
    assert stats.num_draft_tokens > stats.num_accepted_tokens, "no draft was ever rejected"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_greedy_with_drafts_matches_transformers(family, tiny_model):
    path = tiny_model(family)
    prompts = repetitive_prompts(family, 12)
    new_tokens = 16
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
    # A small pool and budget: chunked prefill and preemption happen alongside drafts.
    llm = LLM(
        path,
        block_size=8,
        num_kv_blocks=16,
        max_num_seqs=6,
        max_num_batched_tokens=24,
        num_speculative_tokens=4,
        prompt_lookup_min=1,
        prompt_lookup_max=3,
        tokenizer=False,
    )
    results = run_staggered(llm, prompts, params, per_step=3)
    _assert_drafts_both_ways(llm)
    assert llm.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert_greedy_parity(path, prompts, results, new_tokens, logprob_tol=1e-4)


def test_seeded_sampling_is_unchanged_by_drafts(tiny_model):
    path = tiny_model("llama")
    prompts = repetitive_prompts("seeded", 6)
    params = [
        SamplingParams(temperature=0.8, seed=11, max_tokens=20, ignore_eos=True, logprobs=2),
        SamplingParams(
            temperature=1.0,
            top_k=20,
            seed=12,
            max_tokens=20,
            frequency_penalty=0.5,
            presence_penalty=0.3,
            ignore_eos=True,
        ),
        SamplingParams(
            temperature=0.5, top_p=0.9, seed=13, max_tokens=20, repetition_penalty=1.3, logit_bias={7: 3.0}, logprobs=1
        ),
        SamplingParams(temperature=0.3, seed=14, max_tokens=20, min_tokens=12, min_p=0.05),
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[40, 41, 42]),
        SamplingParams(temperature=0.6, seed=15, max_tokens=20, ignore_eos=True),
    ]
    runs = {}
    for k in (0, 3):
        llm = LLM(
            path,
            block_size=8,
            max_num_batched_tokens=32,
            num_speculative_tokens=k,
            prompt_lookup_min=1,
            prompt_lookup_max=2,
            tokenizer=False,
        )
        runs[k] = llm.generate(prompts, params)
        llm.scheduler.check_integrity()
    _assert_drafts_both_ways(llm)
    for plain, spec in zip(runs[0], runs[3]):
        a, b = plain.outputs[0], spec.outputs[0]
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or [], b.logprobs or []):
            assert (x.token_id, x.rank) == (y.token_id, y.rank)
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


@pytest.mark.slow
def test_stops_inside_accepted_drafts(smollm2, gguf_parsed_once):
    """A real model copying text accepts long drafts; max_tokens and stop tokens that
    fall inside a step's accepted drafts end the output exactly where they would."""
    llm = LLM(smollm2, num_speculative_tokens=6)
    plain = LLM(smollm2)
    text = (
        "The river runs past the old mill, under the stone bridge, and out to the sea. "
        "The river runs past the old mill, under the stone bridge, and out to the sea."
    )
    prompt = llm.chat_token_ids(
        [{"role": "user", "content": f"Repeat the following text word for word, three times:\n\n{text}"}]
    )
    [full] = plain.generate([prompt], SamplingParams(temperature=0, max_tokens=48))
    assert len(full.outputs[0].token_ids) > 30 and full.outputs[0].finish_reason == "stop"
    out = full.outputs[0].token_ids
    stop_token = out[30]
    cases = [SamplingParams(temperature=0, max_tokens=m) for m in (7, 48)]
    cases.append(SamplingParams(temperature=0, max_tokens=48, stop_token_ids=[stop_token]))
    wants = plain.generate([prompt] * len(cases), cases)
    gots = llm.generate([prompt] * len(cases), cases)
    llm.scheduler.check_integrity()
    for want, got in zip(wants, gots):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].text == want.outputs[0].text
        assert (got.outputs[0].finish_reason, got.outputs[0].stop_reason) == (
            want.outputs[0].finish_reason,
            want.outputs[0].stop_reason,
        )
    assert [len(w.outputs[0].token_ids) for w in wants] == [7, len(out), out.index(stop_token) + 1]
    stats = llm.scheduler.stats()
    assert stats.draft_acceptance_rate > 0.5, f"copying should accept most drafts: {stats}"


def test_draft_length_shrinks_after_misses_and_grows_back():
    """The scheduler alone, fed the worker's answers by hand: a miss shortens the
    next guess by one (never below one), a full hit lengthens it by two (up to
    num_speculative_tokens)."""
    from folio.cluster.scheduler import Scheduler
    from folio.protos.config import SchedulerConfig
    from folio.protos.messages import EngineRequest, SampledRequest, StepResult

    sched = Scheduler(
        SchedulerConfig(block_size=4, num_speculative_tokens=4, prompt_lookup_min=1, max_model_len=256), num_blocks=64
    )
    phrase = [5, 6, 7, 8, 9, 10]
    sched.add_request(EngineRequest("r", phrase * 4, SamplingParams(temperature=0, max_tokens=100)))

    def step(answer) -> list[int]:
        """Run one step; `answer(drafts)` gives the tokens the worker 'sampled'."""
        s = sched.schedule()
        drafts = s.cached_requests[0].draft_token_ids if s.cached_requests else []
        tokens = answer(drafts) if (s.new_requests or s.cached_requests) else []
        sched.update_from_output(s, StepResult(s.step_id, [SampledRequest("r", tokens)] if tokens else []))
        sched.check_integrity()
        return drafts

    def follow(t: int) -> int:
        return phrase[(phrase.index(t) + 1) % len(phrase)]

    def miss(d: list[int]) -> list[int]:  # a phrase token, but not the guess
        return [5 if d[0] != 5 else 6]

    def hit(d: list[int]) -> list[int]:  # every guess, then the next token
        return d + [follow(d[-1])]

    r = sched.requests["r"]
    step(lambda d: [5])  # the prompt's step
    after = []
    for answer in [miss] * 5 + [hit] * 3:
        drafts = step(answer)
        assert 0 < len(drafts) <= (after[-1] if after else 4)  # never more than allowed
        after.append(r.draft_len)
    assert after == [3, 2, 1, 1, 1, 3, 4, 4]
