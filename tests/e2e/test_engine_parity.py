"""Greedy parity with transformers under continuous batching, chunked prefill and preemption.

Every prompt must get exactly the tokens transformers gives it alone, with
logprobs within 1e-4, although folio runs them batched, arriving at different
steps, in chunks, and through a pool so small that requests get preempted and
recomputed.
"""

import random

import pytest

from cluster.entrypoints.llm import LLM
from protos.messages import SamplingParams
from tests.hf_reference import assert_greedy_parity, run_staggered
from tests.model_fixtures import TINY_VOCAB

NEW_TOKENS = 8
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2", "gemma", "gpt_neox", "gpt_neox_sequential"])
def test_tiny_models_match_transformers(family, tiny_model):
    path = tiny_model(family)
    rng = random.Random(family)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(3, 70))] for _ in range(18)]
    # 14 blocks of 8 tokens hold fewer than half the requests: preemption must happen.
    llm = LLM(path, block_size=8, num_kv_blocks=14, max_num_seqs=8, max_num_batched_tokens=24, tokenizer=False)
    results = run_staggered(llm, prompts, PARAMS, per_step=3)
    assert llm.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert_greedy_parity(path, prompts, results, NEW_TOKENS, logprob_tol=1e-4)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    llm = LLM(smollm2, block_size=16, num_kv_blocks=8, max_num_seqs=8, max_num_batched_tokens=64)
    text = (
        "The history of the city begins with a small settlement by the river, where traders "
        "met to exchange grain, salt and cloth. Over the centuries the market grew into a town, "
        "the town into a city, and the city into the capital of a region known for its bridges, "
        "its university and its long winters. Visitors today walk the old streets and"
    )
    words = text.split()
    rng = random.Random(0)
    prompts = [llm.tokenizer.encode(" ".join(words[: rng.randint(2, len(words))])) for _ in range(10)]
    results = run_staggered(llm, prompts, PARAMS, per_step=4)
    assert llm.scheduler.num_preemptions > 0
    assert max(len(p) for p in prompts) > 64, "a prompt must need chunked prefill"
    assert_greedy_parity(smollm2, prompts, results, NEW_TOKENS, logprob_tol=1e-4)


def test_capital_of_france(smollm2):
    llm = LLM(smollm2)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    [res] = llm.generate([llm.chat_token_ids(chat)], SamplingParams(temperature=0, max_tokens=20))
    assert res.outputs[0].text.strip() == "The capital of France is Paris."
    assert res.outputs[0].finish_reason == "stop"
