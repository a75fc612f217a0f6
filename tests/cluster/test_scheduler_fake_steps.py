"""The Scheduler alone, driven by a fake worker: no model, no tensors, so hypothesis
can afford many examples. The fake worker keeps each request's tokens as the real
model runner does and "samples" a token that depends only on (request, position),
so whatever the scheduler does (chunked prefill, prefix hits, preemption and
recompute, aborts, priorities, one or two steps in flight, samples deferred while
a request's grammar compiles) every request must end with exactly the tokens a
one-at-a-time run gives it."""

from __future__ import annotations

import zlib
from collections import deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from folio.cluster.scheduler import Scheduler
from folio.protos.config import SchedulerConfig
from folio.protos.grammar import Grammar
from folio.protos.messages import EngineRequest, SampledRequest, SamplingParams, StepRequest, StepResult

EOS = 2
BLOCK = 4


def token_at(request_id: str, position: int) -> int:
    """The fake model: a token per (request, position); EOS now and then."""
    h = zlib.crc32(f"{request_id}/{position}".encode())
    return EOS if h % 23 == 0 else 3 + h % 40


def reference(request_id: str, prompt: list[int], params: SamplingParams, max_model_len: int):
    """The tokens and finish of a request run alone, one token at a time."""
    out: list[int] = []
    while True:
        tok = token_at(request_id, len(prompt) + len(out))
        out.append(tok)
        if len(out) > params.min_tokens and ((tok == EOS and not params.ignore_eos) or tok in params.stop_token_ids):
            return out, "stop"
        if len(out) >= params.max_tokens or len(prompt) + len(out) >= max_model_len:
            return out, "length"


class FakeWorker:
    """Per-request token lists, kept as worker/model_runner.py keeps them. A request
    in `deferrals` has its first that-many samples after each time it joins deferred,
    as a grammar still compiling defers them."""

    def __init__(self, deferrals: dict[str, int]) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.deferrals = deferrals
        self.to_defer: dict[str, int] = {}

    def execute(self, step: StepRequest) -> StepResult:
        for rid in step.finished_ids:
            self.tokens.pop(rid, None)
        out = []
        for r in step.new_requests + step.cached_requests:
            # A sample needs the last token's logits: a scheduled request computes at least it.
            assert r.num_scheduled_tokens > 0, f"{r.request_id} is scheduled with no token to compute"
        for r in step.new_requests:
            self.tokens[r.request_id] = list(r.token_ids)
            self.to_defer[r.request_id] = self.deferrals.get(r.request_id, 0)
            assert r.num_computed_tokens + r.num_scheduled_tokens <= len(r.token_ids)
            if r.num_computed_tokens + r.num_scheduled_tokens == len(r.token_ids):
                out.append(self._sample(r.request_id))
        for r in step.cached_requests:
            tokens = self.tokens[r.request_id]
            end = r.num_computed_tokens + r.num_scheduled_tokens
            assert end <= len(tokens), f"{r.request_id}: computes {end} of {len(tokens)} tokens"
            if end == len(tokens):
                out.append(self._sample(r.request_id))
        return StepResult(step.step_id, out)

    def _sample(self, rid: str) -> SampledRequest:
        if self.to_defer[rid]:
            self.to_defer[rid] -= 1
            return SampledRequest(rid, [])
        tok = token_at(rid, len(self.tokens[rid]))
        self.tokens[rid].append(tok)
        return SampledRequest(rid, [tok])


requests_strategy = st.lists(
    st.tuples(
        st.sampled_from([1, 3, 4, 8, 13, 16, 24, 31, 40]),  # prompt length: few, so prompts repeat
        st.integers(0, 3),  # shared prefix: which of a few prompts it starts with
        st.integers(1, 24),  # max_tokens
        st.integers(0, 2),  # priority
        st.booleans(),  # ignore_eos
        st.integers(0, 12),  # arrives before this step
        st.one_of(st.none(), st.integers(0, 30)),  # aborted at this step, if at all
        st.one_of(st.none(), st.integers(0, 3)),  # with a grammar: samples deferred per join
    ),
    min_size=1,
    max_size=24,
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=requests_strategy,
    num_blocks=st.integers(14, 60),
    max_num_seqs=st.integers(1, 8),
    budget=st.integers(4, 48),
    in_flight=st.sampled_from([1, 2]),
    prefix_caching=st.booleans(),
)
def test_every_request_gets_the_tokens_of_a_run_alone(
    reqs, num_blocks, max_num_seqs, budget, in_flight, prefix_caching
):
    max_model_len = 64
    config = SchedulerConfig(
        block_size=BLOCK,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        enable_prefix_caching=prefix_caching,
        eos_token_ids=(EOS,),
    )
    deferrals: dict[str, int] = {}
    sched, worker = Scheduler(config, num_blocks), FakeWorker(deferrals)
    prefixes = [[5 + i] * 16 + list(range(7, 23)) for i in range(4)]
    want, got, finish = {}, {}, {}
    arrivals: dict[int, list[EngineRequest]] = {}
    aborts: dict[int, list[str]] = {}
    for i, (n, shared, max_tokens, priority, ignore_eos, arrive, abort_at, defer) in enumerate(reqs):
        rid = f"r{i}"
        prompt = (prefixes[shared] + [50 + i] * n)[: max(1, min(n + 8, max_model_len - max_tokens - 1))]
        if defer is None:
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
        else:  # the fake model ignores the grammar; the scheduler only knows there is one
            params = SamplingParams(max_tokens=max_tokens, grammar=Grammar("regex", "[a-z]+"))
            deferrals[rid] = defer
        req = EngineRequest(rid, prompt, params, priority)
        if -(-min(max_model_len, len(prompt) + max_tokens) // BLOCK) > num_blocks:
            continue  # can never fit: add_request refuses it (tested elsewhere)
        want[rid] = reference(rid, prompt, params, max_model_len)
        got[rid] = []
        arrivals.setdefault(arrive, []).append(req)
        if abort_at is not None:
            aborts.setdefault(abort_at, []).append(rid)

    pending: deque[tuple[StepRequest, StepResult]] = deque()
    for step_no in range(2000):
        for req in arrivals.pop(step_no, []):
            sched.add_request(req)
        for out in sched.abort_requests([r for r in aborts.pop(step_no, []) if r not in finish]):
            finish[out.request_id] = out.finish_reason
        if not sched.has_unfinished_requests() and not arrivals and not pending:
            break
        step = sched.schedule()
        assert step.num_scheduled_tokens <= budget
        assert len(step.new_requests) + len(step.cached_requests) <= max_num_seqs
        pending.append((step, worker.execute(step)))
        while pending and (len(pending) >= in_flight or not step.num_scheduled_tokens):
            for out in sched.update_from_output(*pending.popleft()):
                got[out.request_id].extend(out.new_token_ids)
                if out.finished:
                    finish[out.request_id] = out.finish_reason
        sched.check_integrity()
    else:
        raise AssertionError("the requests did not finish in 2000 steps")

    assert set(finish) == set(want)
    for rid, (tokens, reason) in want.items():
        if finish[rid] == "abort":
            assert got[rid] == tokens[: len(got[rid])], rid  # a prefix of what it would have had
        else:
            assert (got[rid], finish[rid]) == (tokens, reason), rid
