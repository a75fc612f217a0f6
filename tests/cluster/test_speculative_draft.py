"""Speculative decoding with a draft model: the target's tokens, fewer steps.

The draft is cut from the target (its first layers under the target's head,
tests/model_fixtures.py early_exit_draft), so on these tiny models it agrees
with the target often but not always: drafts are both accepted and rejected. Greedy
requests must match transformers, seeded ones must get the tokens they get
without speculation, and unseeded ones are rejection-sampled against the
draft's distribution (its statistics: tests/worker/test_sampler.py).
"""

from __future__ import annotations

import asyncio

import pytest

from folio.cluster.entrypoints.llm import LLM
from folio.protos.config import SchedulerConfig
from folio.protos.messages import EngineRequest, SamplingParams
from tests.hf_reference import assert_greedy_parity, hf_greedy, run_staggered
from tests.model_fixtures import early_exit_draft, make_tiny_chat_model, repetitive_prompts
from tests.worker_processes import WorkerProcesses, start_replica


@pytest.fixture(scope="module")
def target_and_draft(tiny_model, model_dir):
    target = tiny_model("llama")  # 3 layers
    return target, early_exit_draft(target, 2, str(model_dir / "llama-draft-2"))


def _assert_drafts_both_ways(stats) -> None:
    assert stats.num_accepted_tokens > 0, "no draft was ever accepted"
    assert stats.num_draft_tokens > stats.num_accepted_tokens, "no draft was ever rejected"


@pytest.mark.slow
def test_greedy_with_a_draft_model_matches_transformers(target_and_draft):
    target, draft = target_and_draft
    prompts = repetitive_prompts("draft", 10)
    new_tokens = 16
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
    # A small pool and budget: chunked prefill and preemption happen alongside drafts,
    # and the draft catches up on whole prompts in chunks of the step budget.
    llm = LLM(
        target,
        speculative_model=draft,
        num_speculative_tokens=3,
        block_size=8,
        num_kv_blocks=20,
        max_num_seqs=6,
        max_num_batched_tokens=24,
        tokenizer=False,
    )
    proposals = _record_proposals(llm)
    results = run_staggered(llm, prompts, params, per_step=3)
    _assert_drafts_both_ways(llm.scheduler.stats())
    assert llm.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert_greedy_parity(target, prompts, results, new_tokens, logprob_tol=1e-4)
    # The draft's cache must hold exactly its own K/V of the request's tokens, after
    # catch-ups in chunks, rejections and preemptions: its greedy drafts are then what
    # transformers' draft model continues the same tokens with.
    assert len(proposals) > 30
    for tokens, drafts in proposals[:: len(proposals) // 12]:
        assert drafts == hf_greedy(draft, tokens, len(drafts)).tokens


def _record_proposals(llm: LLM) -> list[tuple[list[int], list[int]]]:
    """Spy on the drafter: (the request's known tokens, its drafts) per proposal."""
    drafter = llm.worker.runner.drafter
    assert drafter.max_chunk_tokens == 24  # the step budget: whole prompts take several forwards
    propose, seen = drafter.propose, []

    def recording(jobs, *args):
        asked = [list(j.token_ids) for j in jobs]
        out = propose(jobs, *args)
        seen.extend((tokens, drafts) for tokens, (drafts, _) in zip(asked, out) if drafts)
        return out

    drafter.propose = recording
    return seen


def test_seeded_sampling_is_unchanged_by_a_draft_model(target_and_draft):
    target, draft = target_and_draft
    prompts = repetitive_prompts("seeded-draft", 5)
    params = [
        SamplingParams(temperature=0.8, seed=11, max_tokens=20, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, top_k=20, seed=12, max_tokens=20, frequency_penalty=0.5, ignore_eos=True),
        SamplingParams(temperature=0.5, top_p=0.9, seed=13, max_tokens=20, repetition_penalty=1.3, logit_bias={7: 3}),
        SamplingParams(temperature=0.3, seed=14, max_tokens=20, min_tokens=12, min_p=0.05),
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[40, 41, 42]),
    ]
    runs = []
    for options in ({}, {"speculative_model": draft, "num_speculative_tokens": 3}):
        llm = LLM(target, block_size=8, max_num_batched_tokens=32, tokenizer=False, **options)
        runs.append(llm.generate(prompts, params))
        llm.scheduler.check_integrity()
    _assert_drafts_both_ways(llm.scheduler.stats())
    for plain, spec in zip(*runs):
        a, b = plain.outputs[0], spec.outputs[0]
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        for x, y in zip(a.logprobs or [], b.logprobs or []):
            assert (x.token_id, x.rank) == (y.token_id, y.rank)
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_a_draft_equal_to_the_target_is_always_accepted(tiny_model):
    """The draft's own K/V must be exactly the target's at every position it reads: any
    stale or missing position (a catch-up or rollback off by one) costs acceptances.
    Unseeded random requests compare p and q, which agree to rounding here."""
    target = tiny_model("llama")
    llm = LLM(target, speculative_model=target, num_speculative_tokens=4, block_size=8, tokenizer=False)
    prompts = repetitive_prompts("same", 4)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    greedy = llm.scheduler.stats()
    assert greedy.num_draft_tokens > 60
    assert greedy.num_accepted_tokens == greedy.num_draft_tokens
    llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True))
    both = llm.scheduler.stats()
    drafted = both.num_draft_tokens - greedy.num_draft_tokens
    assert both.num_accepted_tokens - greedy.num_accepted_tokens >= 0.97 * drafted > 0


def test_speculation_pauses_in_a_large_batch(target_and_draft):
    target, draft = target_and_draft
    prompts = repetitive_prompts("batch", 6)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    options = dict(speculative_model=draft, num_speculative_tokens=3, tokenizer=False)
    llm = LLM(target, speculative_max_batch=5, **options)
    plain = LLM(target, tokenizer=False).generate(prompts, params)
    # Six at once: no drafts until only five are left running, then drafts again.
    spec = llm.generate(prompts, params)
    assert [r.outputs[0].token_ids for r in spec] == [r.outputs[0].token_ids for r in plain]
    assert llm.scheduler.stats().num_draft_tokens == 0, "all six ran to the end together"
    llm.generate(prompts[:5], params)
    assert llm.scheduler.stats().num_draft_tokens > 0


def test_a_draft_with_another_vocabulary_is_refused(model_dir, tiny_model):
    chat = make_tiny_chat_model(model_dir)  # SmolLM2's tokenizer
    with pytest.raises(ValueError, match="only one of them has a tokenizer"):
        LLM(chat, speculative_model=tiny_model("llama"), num_speculative_tokens=2)
    with pytest.raises(ValueError, match="needs --num-speculative-tokens"):
        LLM(chat, speculative_model=chat)


@pytest.mark.slow
def test_tp2_with_a_draft_on_rank_0_matches_tp1_without(target_and_draft):
    """Rank 0 drafts and broadcasts; rank 1 has no draft model. Greedy tokens equal a
    single worker's without speculation."""
    target, draft = target_and_draft
    prompts = repetitive_prompts("tp", 3)

    async def generate(world_size: int, speculative: bool) -> tuple[list, object]:
        config = SchedulerConfig(block_size=16, max_model_len=0, num_speculative_tokens=3 if speculative else 0)
        with WorkerProcesses(world_size) as addresses:
            replica = await start_replica(addresses, target, config, speculative_model=draft if speculative else "")
            try:
                loop = asyncio.get_running_loop()
                done = [loop.create_future() for _ in prompts]
                outs: list[list[int]] = [[] for _ in prompts]
                params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
                for i, p in enumerate(prompts):

                    def put(o, i=i):
                        outs[i].extend(o.new_token_ids)
                        if o.finished:
                            done[i].set_result(None)

                    replica.add_request(EngineRequest(f"r{i}", p, params), put)
                await asyncio.wait_for(asyncio.gather(*done), 120)
                return outs, replica.scheduler.stats()
            finally:
                await replica.close()

    reference, _ = asyncio.run(generate(1, False))
    tokens, stats = asyncio.run(generate(2, True))
    assert tokens == reference
    _assert_drafts_both_ways(stats)


def test_a_worker_with_a_draft_bounds_what_a_step_asks(target_and_draft):
    from folio.protos.config import MAX_SPECULATIVE_TOKENS
    from folio.protos.messages import CachedRequest, NewRequest, StepRequest

    target, draft = target_and_draft
    worker = LLM(target, speculative_model=draft, num_speculative_tokens=2, tokenizer=False).worker
    prompt = list(range(1, 11))
    greedy = SamplingParams(temperature=0, max_tokens=40)
    news = [NewRequest(f"r{i}", prompt, 10, greedy, [i], 0, 10) for i in range(3)]
    worker.execute_step(StepRequest(1, new_requests=news))
    too_many = MAX_SPECULATIVE_TOKENS + 1
    result = worker.execute_step(
        StepRequest(
            2,
            cached_requests=[
                CachedRequest("r0", [3, 4], 10, 2 + too_many, num_model_drafts=1 + too_many),
                CachedRequest("r1", [5], 10, 4, draft_token_ids=[5], num_model_drafts=2),
                CachedRequest("r2", [], 10, 3, num_model_drafts=2),
            ],
        )
    )
    errors = {e.request_id: e.message for e in result.errors}
    assert f"at most {MAX_SPECULATIVE_TOKENS}" in errors["r0"]
    assert "draft tokens and model drafts" in errors["r1"]
    (out,) = result.outputs
    assert out.request_id == "r2" and 1 <= len(out.token_ids) <= 3
