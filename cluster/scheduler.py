"""Continuous batching for one replica: who computes how many tokens next step.

There is no prefill phase and no decode phase. Each request has
num_computed_tokens and num_tokens; every step hands out a token budget so
computed catches up: a new prompt gets a chunk (chunked prefill), a running
request gets one token (decode), a prefix-cache hit starts with tokens already
computed, and a preempted request starts over at zero and is recomputed.

Interface (vLLM v1 style): schedule() returns the StepRequest for the workers,
update_from_output() consumes their StepResult. Up to two steps may be in
flight: schedule() may run again before the previous result arrives, because
tokens that in-flight steps will sample are counted in Request.num_pending.

Speculative decoding (config.num_speculative_tokens > 0): a decoding request
whose last token is known gets up to k draft tokens from its n-gram index
(cluster/ngram.py), or with a draft model (config.draft_model) asks the worker
to draft k itself, and computes 1 + k tokens; the result carries the drafts
the worker accepted plus one sampled token, and num_computed_tokens rolls
back past the rejected drafts. Drafts need the last token, so with
speculation on a decoding request waits for its previous step to return
rather than overlap it. Speculation pauses while more than
config.speculative_max_batch requests run: a step that large is bound by
compute, so verifying drafts costs more than the steps they save, and the
requests overlap their steps again instead.

Structured output: the worker samples a constrained request only once its
grammar has compiled (on the worker's own thread). Until then it defers the
sample, answering the step with no token, and the request's last token is
scheduled again. Until its first sample returns, such a request does not
overlap its own in-flight step, whose sample may yet be deferred.

Blocks are published to the prefix cache when the step that computes them is
scheduled, not when it returns. That is safe because a worker runs steps in
order and, within a layer, writes all of a step's new K/V before any attention
reads the pool; so even a request admitted in the same step (an n > 1 sibling)
can read a block its sibling writes.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from folio.cluster.block_manager import BlockHash, BlockManager, reusable_blocks
from folio.cluster.ngram import NgramIndex
from folio.cluster.request import Request, Status
from folio.protos.config import SchedulerConfig
from folio.protos.messages import (
    CachedRequest,
    EngineRequest,
    NewRequest,
    RequestOutput,
    StepRequest,
    StepResult,
    TokenLogprob,
)


@dataclass
class _Scheduled:
    """What a step promised for one request, to match its result against."""

    request: Request
    epoch: int
    samples: bool
    num_drafts: int = 0


class _Plan:
    """The step being built: tokens (and drafts) per request, what is left of the budget."""

    def __init__(self, budget: int):
        self.tokens: dict[Request, int] = {}
        self.drafts: dict[Request, list[int]] = {}
        self.model_drafts: dict[Request, int] = {}  # drafts the worker's draft model proposes
        self.left = budget

    def add(self, r: Request, n: int, drafts: Optional[list[int]] = None, model_drafts: int = 0) -> None:
        self.tokens[r] = n
        if drafts:
            self.drafts[r] = drafts
        if model_drafts:
            self.model_drafts[r] = model_drafts
        self.left -= n

    def drop(self, r: Request) -> None:
        self.left += self.tokens.pop(r, 0)
        self.drafts.pop(r, None)
        self.model_drafts.pop(r, None)


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    prefix_hit_tokens: int
    prefix_query_tokens: int
    num_preemptions: int
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_deferred_samples: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_blocks: int):
        if config.max_model_len <= 0:  # 0 means "the model's": settled by whoever loaded it
            raise ValueError("the scheduler needs a concrete max_model_len (the model's own or less)")
        self.config = config
        self.bs = config.block_size
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []  # sorted by (priority, seq)
        self._waiting: list[tuple[int, int, Request]] = []  # heap; finished entries skipped
        self._seq = itertools.count()
        self._step_ids = itertools.count()
        self._finished_for_worker: list[str] = []
        self._inflight: dict[int, list[_Scheduled]] = {}
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0
        self.num_preemptions = 0
        self.computed_tokens_total = 0  # tokens sent for compute, over the lifetime
        self.num_draft_tokens = 0  # speculative drafts sent / accepted, over the lifetime
        self.num_accepted_tokens = 0
        self.num_deferred_samples = 0  # samples the worker put off, a grammar still compiling

    # ---------------------------------------------------------------- intake
    def add_request(self, req: EngineRequest) -> None:
        """Queue a request. Raises ValueError when it can never run here."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt must contain at least one token")
        if n >= self.config.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, which leaves no room for output "
                f"under the maximum context length of {self.config.max_model_len}"
            )
        if (
            len(req.output_token_ids) >= req.sampling_params.max_tokens
            or n + len(req.output_token_ids) >= self.config.max_model_len
        ):
            raise ValueError("the request already has all its output tokens")
        most = min(self.config.max_model_len, n + req.sampling_params.max_tokens)
        if self._num_blocks(most) > self.blocks.num_blocks:
            raise ValueError(
                f"prompt plus max_tokens ({most} tokens) exceeds the KV cache of "
                f"{self.blocks.num_blocks * self.bs} tokens"
            )
        r = Request.from_engine_request(req, next(self._seq))
        if r.params.prompt_logprobs is not None:
            r.prompt_logprobs = [None]
        r.update_block_keys(self.bs)
        self.requests[r.request_id] = r
        self._push_waiting(r)

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        """Finish requests at once and free what they hold."""
        outs = []
        for rid in request_ids:
            r = self.requests.get(rid)
            if r is not None:
                self._finish(r, Status.FINISHED_ABORTED)
                outs.append(self._output(r, [], []))
        return outs

    def fail_requests(self, request_ids: Iterable[str]) -> list[str]:
        """Forget requests the worker does not hold (never sent: they could not be encoded;
        or refused and dropped by it) and free their blocks; no finished id goes out for
        them. Returns the ids that were here; their callers tell the requests' owners."""
        failed = []
        for rid in request_ids:
            r = self.requests.get(rid)
            if r is not None:
                r.on_worker = False
                self._finish(r, Status.FINISHED_ABORTED)
                failed.append(rid)
        return failed

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---------------------------------------------------------------- schedule
    def schedule(self) -> StepRequest:
        plan = _Plan(self.config.max_num_batched_tokens)
        preempted = False
        speculate = self.config.num_speculative_tokens and len(self.running) <= self.config.speculative_max_batch

        # Running requests first, best priority first; the worst give way when blocks run out.
        for r in list(self.running):
            if plan.left == 0:
                break
            if r.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(r.num_tokens - r.num_computed_tokens, plan.left)
            if n <= 0:
                continue
            if r.num_pending and r.params.grammar is not None and not r.grammar_ready:
                continue  # the in-flight step may defer its sample (the grammar still compiling)
            drafts, model_drafts = None, 0
            if speculate and r.num_tokens - r.num_computed_tokens == 1:
                if r.num_pending:
                    continue  # drafts need the token the in-flight step samples
                k = self._draft_len(r, plan.left - 1)
                if self.config.draft_model:
                    model_drafts = k
                elif k > 0:
                    drafts = self._ngram_drafts(r, k)
                n += model_drafts + len(drafts or ())
            need = self._num_blocks(r.num_computed_tokens + n) - len(r.block_ids)
            if (drafts or model_drafts) and not self.blocks.can_allocate(need):
                drafts, model_drafts, n = None, 0, 1  # a guess never preempts anyone
                need = self._num_blocks(r.num_computed_tokens + n) - len(r.block_ids)
            while not self.blocks.can_allocate(need):
                victim = self.running[-1]
                self._preempt(victim, plan)
                preempted = True
                if victim is r:
                    break
            else:
                r.block_ids.extend(self.blocks.allocate(need))
                plan.add(r, n, drafts, model_drafts)

        # Then waiting requests in (priority, arrival) order, unless someone was just preempted.
        while not preempted and plan.left > 0:
            r = self._peek_waiting()
            if r is None:
                break
            if len(self.running) >= self.config.max_num_seqs:
                if self._preempt_worse_than(r, plan):
                    continue
                break
            hit = self._lookup_prefix(r)
            computed = len(hit) * self.bs
            n = min(r.num_tokens - computed, plan.left)
            need = self._num_blocks(computed + n) - len(hit)
            if not self.blocks.can_allocate(need, reuse=hit):
                if self._preempt_worse_than(r, plan):
                    continue
                break
            heapq.heappop(self._waiting)
            self._admit(r, hit, need)
            plan.add(r, n)
            # Published now, so a sibling admitted later in this same step already hits.
            self._publish_blocks(r, r.num_computed_tokens + n)

        return self._build_step(plan)

    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.bs)

    def _draft_len(self, r: Request, budget: int) -> int:
        """How many drafts a decoding request may have: its adapted length, none past its
        max_tokens or the context limit (a step computes 1 + drafts positions)."""
        return max(
            0,
            min(
                r.draft_len or self.config.num_speculative_tokens,
                budget,
                r.params.max_tokens - r.num_output_tokens - 1,
                self.config.max_model_len - len(r.token_ids) - 1,
            ),
        )

    def _ngram_drafts(self, r: Request, k: int) -> list[int]:
        if r.ngrams is None:
            r.ngrams = NgramIndex(self.config.prompt_lookup_min, self.config.prompt_lookup_max)
        return r.ngrams.propose(r.token_ids, k)

    def _adapt_draft_len(self, r: Request, proposed: int, accepted: int) -> None:
        """Longer guesses while they all land, shorter after a miss (down to one), so a
        request whose text does not repeat wastes little compute on rejected positions."""
        k = self.config.num_speculative_tokens
        current = r.draft_len or k
        r.draft_len = min(k, current + 2) if accepted == proposed else max(1, current - 1)

    def _admit(self, r: Request, hit: list[int], need: int) -> None:
        self.blocks.take(hit)
        r.block_ids = hit + self.blocks.allocate(need)
        r.num_computed_tokens = len(hit) * self.bs
        r.num_published_blocks = len(hit)
        if r.first_scheduled_time is None:
            r.first_scheduled_time = time.monotonic()
            r.num_cached_tokens = r.num_computed_tokens
        if r.params.prompt_logprobs is None:
            self.prefix_hit_tokens += r.num_computed_tokens
            self.prefix_query_tokens += r.num_tokens
        r.status = Status.RUNNING
        bisect.insort(self.running, r, key=lambda x: x.sort_key)

    def _lookup_prefix(self, r: Request) -> list[int]:
        """Cached leading blocks, leaving at least one token to compute (for its logits)."""
        if r.params.prompt_logprobs is not None:
            return []  # every prompt position must produce logits
        hit = self.blocks.cached_prefix(r.block_keys)
        return hit[: reusable_blocks(r.num_tokens, self.bs)]

    def _build_step(self, plan: _Plan) -> StepRequest:
        step = StepRequest(step_id=next(self._step_ids), finished_ids=self._finished_for_worker)
        self._finished_for_worker = []
        record = []
        for r, n in plan.tokens.items():
            drafts = plan.drafts.get(r, [])
            model_drafts = plan.model_drafts.get(r, 0)
            num_drafts = len(drafts) + model_drafts
            if r.on_worker:
                step.cached_requests.append(
                    CachedRequest(
                        request_id=r.request_id,
                        new_block_ids=r.block_ids[r.num_sent_blocks :],
                        num_computed_tokens=r.num_computed_tokens,
                        num_scheduled_tokens=n,
                        draft_token_ids=drafts,
                        num_model_drafts=model_drafts,
                    )
                )
            else:
                step.new_requests.append(
                    NewRequest(
                        request_id=r.request_id,
                        token_ids=list(r.token_ids),
                        num_prompt_tokens=r.num_prompt_tokens,
                        sampling_params=r.params,
                        block_ids=list(r.block_ids),
                        num_computed_tokens=r.num_computed_tokens,
                        num_scheduled_tokens=n,
                        num_output_tokens=r.num_output_tokens,
                    )
                )
                r.on_worker = True
            r.num_sent_blocks = len(r.block_ids)
            r.num_computed_tokens += n
            self.computed_tokens_total += n
            self.num_draft_tokens += num_drafts
            samples = r.num_computed_tokens - num_drafts == r.num_tokens
            r.num_pending += samples
            record.append(_Scheduled(r, r.epoch, samples, num_drafts))
            self._publish_blocks(r, r.num_computed_tokens)
        self._inflight[step.step_id] = record
        return step

    def _publish_blocks(self, r: Request, num_scheduled_through: int) -> None:
        """Offer every full block whose tokens are known and scheduled to the prefix cache."""
        upto = min(num_scheduled_through, len(r.token_ids)) // self.bs
        for b in range(r.num_published_blocks, upto):
            self.blocks.cache(r.block_ids[b], r.block_keys[b])
        r.num_published_blocks = max(upto, r.num_published_blocks)

    # ---------------------------------------------------------------- preemption
    def _preempt(self, r: Request, plan: _Plan) -> None:
        """Give up r's blocks; it waits again and will be recomputed from its tokens."""
        plan.drop(r)
        self.running.remove(r)
        self.blocks.free(r.block_ids)
        r.block_ids = []
        r.num_computed_tokens = r.num_pending = r.num_published_blocks = r.num_sent_blocks = 0
        r.grammar_ready = False  # the worker builds its matcher anew
        r.epoch += 1
        r.num_preemptions += 1
        self.num_preemptions += 1
        if r.params.prompt_logprobs is not None:
            r.prompt_logprobs = [None]
        if r.on_worker:
            self._finished_for_worker.append(r.request_id)
            r.on_worker = False
        r.status = Status.WAITING
        self._push_waiting(r)

    def _preempt_worse_than(self, r: Request, plan: _Plan) -> bool:
        """Priority scheduling: a strictly better waiting request displaces the worst running one."""
        if self.running and self.running[-1].priority > r.priority:
            self._preempt(self.running[-1], plan)
            return True
        return False

    # ---------------------------------------------------------------- results
    def update_from_output(self, step: StepRequest, result: StepResult) -> list[RequestOutput]:
        """Apply a step's sampled tokens; return what each request produced."""
        record = {s.request.request_id: s for s in self._inflight.pop(result.step_id)}
        outs = []
        for o in result.outputs:
            s = record.get(o.request_id)
            if s is None:
                continue
            r = s.request
            if r.status is not Status.RUNNING or r.epoch != s.epoch:
                continue  # finished, aborted or preempted since: stale
            if o.prompt_logprobs and len(r.prompt_logprobs) < r.num_prompt_tokens:
                r.prompt_logprobs.extend(o.prompt_logprobs)
            if not s.samples:
                continue
            r.num_pending -= 1
            if not o.token_ids:  # deferred: its grammar is still compiling on the worker
                r.num_computed_tokens -= 1 + s.num_drafts
                self.num_deferred_samples += 1
                continue
            r.grammar_ready = True
            accepted = len(o.token_ids) - 1  # drafts the worker kept
            r.num_computed_tokens -= s.num_drafts - accepted
            self.num_accepted_tokens += accepted
            if s.num_drafts:
                self._adapt_draft_len(r, s.num_drafts, accepted)
            new, status = [], None
            for tok in o.token_ids:  # a stop mid-way drops the tokens after it
                r.token_ids.append(tok)
                new.append(tok)
                status = self._stop_status(r, tok)
                if status is not None:
                    break
            logprobs = o.logprobs[: len(new)]
            r.output_logprobs.extend(logprobs)
            r.update_block_keys(self.bs)
            if status is not None:
                self._finish(r, status)
            outs.append(self._output(r, new, logprobs))
        return outs

    def _stop_status(self, r: Request, token: int) -> Optional[Status]:
        p = r.params
        if r.num_output_tokens > p.min_tokens:
            if not p.ignore_eos and token in self.config.eos_token_ids:
                return Status.FINISHED_STOPPED
            if token in p.stop_token_ids:
                r.stop_reason = token
                return Status.FINISHED_STOPPED
        if r.num_output_tokens >= p.max_tokens or len(r.token_ids) >= self.config.max_model_len:
            return Status.FINISHED_LENGTH
        return None

    def _finish(self, r: Request, status: Status) -> None:
        if r.status is Status.RUNNING:
            self.running.remove(r)
        self.blocks.free(r.block_ids)
        r.block_ids = []
        r.status = status
        del self.requests[r.request_id]
        if r.on_worker:
            self._finished_for_worker.append(r.request_id)
            r.on_worker = False

    def _output(self, r: Request, new_tokens: list[int], logprobs: list[TokenLogprob]) -> RequestOutput:
        first = r.num_output_tokens == len(new_tokens)
        return RequestOutput(
            request_id=r.request_id,
            new_token_ids=new_tokens,
            logprobs=logprobs or None,
            prompt_logprobs=list(r.prompt_logprobs) if first and r.params.prompt_logprobs is not None else None,
            finish_reason=r.status.value if r.status.finished else None,
            stop_reason=r.stop_reason,
            num_prompt_tokens=r.num_prompt_tokens,
            num_cached_tokens=r.num_cached_tokens,
        )

    # ---------------------------------------------------------------- queue, stats, checks
    def _push_waiting(self, r: Request) -> None:
        heapq.heappush(self._waiting, (r.priority, r.seq, r))

    def _peek_waiting(self) -> Optional[Request]:
        while self._waiting:
            r = self._waiting[0][2]
            if r.status is Status.WAITING:
                return r
            heapq.heappop(self._waiting)  # finished while waiting
        return None

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.requests) - len(self.running),
            kv_usage=self.blocks.usage,
            num_free_blocks=self.blocks.num_free,
            prefix_hit_tokens=self.prefix_hit_tokens,
            prefix_query_tokens=self.prefix_query_tokens,
            num_preemptions=self.num_preemptions,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens,
            num_deferred_samples=self.num_deferred_samples,
        )

    # ---------------------------------------------------------------- questions
    # What routing, admission and failover ask of a replica; nothing outside reads its fields.
    def prefix_hit_blocks(self, keys: Sequence[BlockHash]) -> int:
        """Leading blocks of `keys` (a prompt's block hashes) this replica has cached, is
        computing, or has queued: by the time a request routed here runs, it holds them."""
        if not self.blocks.enable_prefix_caching:
            return 0
        cached = len(self.blocks.cached_prefix(keys))
        # Keys chain over their whole prefix, so a key in this set means the prefix up to it is queued.
        queued = {k for r in self.requests.values() if r.status is Status.WAITING for k in r.block_keys}
        return max(cached, next((i for i, k in enumerate(keys) if k not in queued), len(keys)))

    def load_tokens(self) -> int:
        """Work still to do, in tokens: uncomputed prompt plus remaining output of each request."""
        return sum(
            max(0, r.num_tokens - r.num_computed_tokens) + max(0, r.params.max_tokens - r.num_output_tokens)
            for r in self.requests.values()
        )

    @property
    def token_capacity(self) -> int:
        """Tokens the whole KV pool holds: no request can grow past it."""
        return self.blocks.num_blocks * self.bs

    def is_on_worker(self, request_id: str) -> bool:
        """Whether the workers hold state for the request (it ran there and was not preempted)."""
        r = self.requests.get(request_id)
        return r is not None and r.on_worker

    def check_integrity(self) -> None:
        """Assert the block bookkeeping; with no live request, every block is free."""
        for r in self.requests.values():
            assert r.status is Status.RUNNING or not r.block_ids, f"{r.request_id} waits holding blocks"
        self.blocks.check_integrity(r.block_ids for r in self.requests.values())
        if not self.requests:
            assert self.blocks.num_free == self.blocks.num_blocks, "blocks leaked while idle"
