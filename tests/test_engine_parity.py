"""Greedy parity with transformers under continuous batching, chunked prefill and preemption.

Every prompt must get exactly the tokens transformers gives it alone, with
logprobs within 1e-4, although folio runs them batched, arriving at different
steps, in chunks, and through a pool so small that requests get preempted and
recomputed.
"""
import random

import pytest

from cluster.llm import LLM
from protos.messages import SamplingParams
from tests.hf_reference import hf_greedy
from tests.model_fixtures import TINY_VOCAB

NEW_TOKENS = 8


def _run_staggered(llm: LLM, prompts: list[list[int]], per_step: int) -> dict[str, list]:
    """Add `per_step` prompts before each step until all are in; run to completion."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    ids, pending = [], list(prompts)
    results = {}
    while pending or llm.has_unfinished():
        for p in pending[:per_step]:
            ids.append(llm.add_request(p, params))
        pending = pending[per_step:]
        for res in llm.step():
            results[res.request_id] = res
        llm.scheduler.check_integrity()
    llm.scheduler.check_integrity()
    return [results[i] for i in ids]


def _check(path, prompts, results, logprob_tol=1e-4):
    for p, res in zip(prompts, results):
        want_tokens, want_lps = hf_greedy(path, p, NEW_TOKENS)
        out = res.outputs[0]
        assert out.token_ids == want_tokens, f"prompt of {len(p)} tokens diverged"
        got = [lp.logprob for lp in out.logprobs]
        assert max(abs(a - b) for a, b in zip(got, want_lps)) < logprob_tol


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2"])
def test_tiny_models_match_transformers(family, tiny_model):
    path = tiny_model(family)
    rng = random.Random(family)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(3, 70))] for _ in range(18)]
    # 14 blocks of 8 tokens hold fewer than half the requests: preemption must happen.
    llm = LLM(path, block_size=8, num_blocks=14, max_num_seqs=8, max_num_batched_tokens=24,
              tokenizer=False)
    results = _run_staggered(llm, prompts, per_step=3)
    assert llm.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    _check(path, prompts, results)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    llm = LLM(smollm2, block_size=16, num_blocks=8, max_num_seqs=8, max_num_batched_tokens=64)
    text = ("The history of the city begins with a small settlement by the river, where traders "
            "met to exchange grain, salt and cloth. Over the centuries the market grew into a town, "
            "the town into a city, and the city into the capital of a region known for its bridges, "
            "its university and its long winters. Visitors today walk the old streets and")
    words = text.split()
    rng = random.Random(0)
    prompts = [llm.tokenizer.encode(" ".join(words[: rng.randint(2, len(words))])) for _ in range(16)]
    results = _run_staggered(llm, prompts, per_step=4)
    assert llm.scheduler.num_preemptions > 0
    assert max(len(p) for p in prompts) > 64, "a prompt must need chunked prefill"
    _check(smollm2, prompts, results)


def test_capital_of_france(smollm2):
    llm = LLM(smollm2)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    [res] = llm.generate([llm.chat_token_ids(chat)], SamplingParams(temperature=0, max_tokens=20))
    assert res.outputs[0].text.strip() == "The capital of France is Paris."
    assert res.outputs[0].finish_reason == "stop"
