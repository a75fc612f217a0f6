"""Scheduling behaviour on a real tiny model: prefix caching, n > 1, priority, aborts, and
hypothesis-driven properties of random arrivals, aborts and preemptions."""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from folio.cluster.entrypoints.llm import LLM
from folio.protos.messages import SamplingParams
from tests.model_fixtures import TINY_VOCAB

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _tokens(results):
    return [r.outputs[0].token_ids for r in results]


def test_shared_prefix_is_computed_once(tiny_model):
    path = tiny_model("llama")
    rng = random.Random(1)
    prefix = [rng.randrange(3, TINY_VOCAB) for _ in range(64)]
    prompts = [prefix + [rng.randrange(3, TINY_VOCAB) for _ in range(5)] for _ in range(6)]

    def run(caching: bool):
        llm = LLM(path, block_size=8, num_kv_blocks=64, enable_prefix_caching=caching, tokenizer=False)
        first = llm.generate(prompts[:1], GREEDY)  # warms the cache with the prefix
        rest = llm.generate(prompts[1:], GREEDY)
        llm.scheduler.check_integrity()
        return _tokens(first + rest), llm.scheduler.computed_tokens_total, rest

    cached_out, cached_work, rest = run(True)
    plain_out, plain_work, _ = run(False)
    assert cached_out == plain_out
    # Each of the 5 later requests skips the prefix's 8 full blocks.
    assert plain_work - cached_work == 5 * 64
    assert all(r.num_cached_tokens == 64 for r in rest)


def test_n_siblings_share_prompt_blocks_in_one_step(tiny_model):
    llm = LLM(tiny_model("llama"), block_size=8, num_kv_blocks=64, tokenizer=False)
    prompt = list(range(10, 53))  # 43 tokens: 5 full blocks + 3
    [res] = llm.generate([prompt], SamplingParams(n=4, temperature=0, max_tokens=5, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in res.outputs}) == 1, "greedy siblings must agree"
    # One sibling computes the prompt; the others reuse its 5 full blocks in the same
    # step and compute only the 3 tokens of the partial block.
    decode_tokens = 4 * 4
    assert llm.scheduler.computed_tokens_total == 43 + 3 * 3 + decode_tokens


def test_lower_priority_value_runs_first(tiny_model):
    llm = LLM(tiny_model("llama"), block_size=8, num_kv_blocks=64, max_num_seqs=1, tokenizer=False)
    late = llm.add_request([5, 6, 7], GREEDY, request_id="late", priority=5)
    urgent = llm.add_request([5, 6, 8], GREEDY, request_id="urgent", priority=0)
    order = []
    while llm.has_unfinished():
        order += [r.request_id for r in llm.step()]
    assert order == [urgent, late]


def test_priority_preempts_worse_running_request(tiny_model):
    llm = LLM(tiny_model("llama"), block_size=8, num_kv_blocks=64, max_num_seqs=1, tokenizer=False)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm.add_request([5, 6, 7], params, request_id="background", priority=3)
    llm.step()
    llm.add_request([9, 9, 9], params, request_id="urgent", priority=0)
    order = []
    while llm.has_unfinished():
        order += [r.request_id for r in llm.step()]
    assert order == ["urgent", "background"]
    assert llm.scheduler.num_preemptions == 1


def test_abort_frees_every_block_at_any_moment(tiny_model):
    llm = LLM(tiny_model("llama"), block_size=8, num_kv_blocks=32, tokenizer=False)
    ids = [llm.add_request(list(range(3, 3 + 20 + i)), SamplingParams(max_tokens=30)) for i in range(5)]
    llm.step()
    llm.step()
    for rid in ids:
        llm.abort(rid)
    assert not llm.has_unfinished()
    llm.step()  # tells the worker to drop them
    llm.scheduler.check_integrity()
    assert not llm.worker.runner.states, "the worker must drop aborted requests"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    script=st.lists(
        st.tuples(
            st.sampled_from(["add", "add", "abort", "step", "step"]),
            st.integers(1, 40),
            st.integers(1, 12),
            st.integers(0, 2),
        ),
        min_size=1,
        max_size=40,
    ),
    speculate=st.sampled_from([0, 3]),
)
def test_random_arrivals_aborts_and_preemptions_keep_the_books(tiny_model, script, speculate):
    """With and without speculative drafts (whose rejected tails roll back)."""
    budget, max_seqs = 20, 4
    llm = LLM(
        tiny_model("llama"),
        block_size=4,
        num_kv_blocks=24,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        num_speculative_tokens=speculate,
        prompt_lookup_min=1,
        tokenizer=False,
    )
    sched = llm.scheduler
    live, ended, wanted = [], {}, {}

    def one_step():
        step = sched.schedule()
        assert step.num_scheduled_tokens <= budget
        assert len(step.new_requests) + len(step.cached_requests) <= max_seqs
        assert len({b for r in sched.running for b in r.block_ids}) <= sched.blocks.num_blocks
        result = llm.engine.executor.execute(step)
        for res in llm._apply(sched.update_from_output(step, result)):
            ended[res.request_id] = res
        sched.check_integrity()

    for op, length, max_tokens, prio in script:
        if op == "add":
            rng = random.Random(length * 31 + max_tokens)
            phrase = [rng.randrange(3, TINY_VOCAB) for _ in range(1 + length // 4)]
            prompt = (phrase * 4)[:length]  # repeats, so there is something to draft
            live.append(
                llm.add_request(
                    prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), priority=prio
                )
            )
            wanted[live[-1]] = max_tokens
        elif op == "abort" and live:
            rid = live[length % len(live)]
            if rid not in ended:
                llm.abort(rid)
                ended[rid] = None
        else:
            one_step()
    while llm.has_unfinished():
        one_step()
    one_step()
    sched.check_integrity()
    assert not llm.worker.runner.states
    for rid in live:
        assert rid in ended, f"{rid} neither finished nor aborted"
        res = ended[rid]
        if res is not None:
            assert res.outputs[0].finish_reason == "length"
            assert len(res.outputs[0].token_ids) == wanted[rid]
