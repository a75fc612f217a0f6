"""Token sampling for one worker step: logits in, one token (and its logprob) per request out.

Choosing a request's token, in order (OpenAI / vLLM semantics):
  1. logit_bias is added.
  2. While the request has fewer than min_tokens outputs, its stop_token_ids and the EOS ids
     (unless ignore_eos, where EOS is an ordinary token) are set to -inf.
  3. repetition_penalty (HF: for tokens in prompt + output, a positive logit is divided by it,
     any other multiplied), then frequency_penalty x (count in output) and presence_penalty
     (if in output) are subtracted.
  3b. A request with a grammar (structured output) has every token its grammar does not allow
     next set to -inf; once the grammar is complete only EOS is allowed.
  4. temperature < 1e-5 takes the argmax. Otherwise: divide by temperature, keep the top_k,
     keep the smallest most-likely set with probability >= top_p, drop tokens with probability
     below min_p x the largest, and sample from what is left.
Logprobs ignore all of that: they are log_softmax of the logits exactly as the model gave them.

Randomness: sampling draws q ~ Exp(1) per vocab entry and takes argmax(p / q), which picks token
i with probability p_i (the exponential form of the Gumbel-max trick). For a request with a seed,
the q of its k-th output token comes from a generator seeded by (seed, k) alone, so its tokens do
not depend on the rest of the batch, its row, or a preemption rebuild. Unseeded rows share one
generator.

Per-step cost: Python work is a few list comprehensions over the batch; each stage runs as batched
tensor ops over only the rows that need it, so a greedy batch without bias or penalties is one
argmax (plus a log_softmax over the rows that ask for logprobs).

Grammars (worker/grammar_state.py): each constrained request owns a GrammarState, whose
matcher masks its logits (step 3b) and accepts every token recorded for it. A grammar still
compiling when its request would sample makes ready() report the request as not ready; the
model runner then leaves it out of that step's sampling (see worker/model_runner.py), so one
slow compile delays only its own request.

Invariants, for every request id held:
  - _Request.num_outputs is the number of output tokens the request has: those passed to
    add_request plus one per sample() row since.
  - If its params need penalties it owns row `slot` of the penalty buffers, where _seen[slot]
    marks exactly the tokens in prompt + outputs and _counts[slot, t] is how often t occurs in
    the outputs. Rows not owned by a request hold stale values and are reset when handed out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from folio.protos.grammar import GrammarCompiler
from folio.protos.messages import SamplingParams, TokenLogprob
from folio.worker.grammar_state import GrammarState, mask_by_grammar

_MASK64 = (1 << 64) - 1
# prompt_logprobs works through this many positions at a time to bound its [rows, V] temporaries.
_PROMPT_LOGPROBS_CHUNK = 512


@dataclass
class _Request:
    params: SamplingParams
    num_outputs: int
    slot: int  # row of the penalty buffers; -1 without penalties
    min_tokens_ids: list[int]  # banned while num_outputs < params.min_tokens
    bias_ids: list[int]
    bias_values: list[float]
    grammar: Optional[GrammarState] = None  # a structured-output request's grammar


class Proposal(NamedTuple):
    """A draft model's token for one position and the distribution ([V]) it was drawn from."""

    token: int
    probs: Tensor


class Sampler:
    """Samples one token per request per step and keeps the per-request state that needs.

    The model runner calls add_request when a request arrives (or is rebuilt after preemption,
    with its outputs so far), ready and then sample once per step for each request whose logits
    are ready, and remove_request when the request finishes or is dropped.
    """

    def __init__(
        self,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        device="cpu",
        seed: Optional[int] = None,
        grammars: Optional[GrammarCompiler] = None,
    ):
        """vocab_size: width of the logits (the model's, padding included).
        seed: seeds the generator that unseeded requests share; None draws one from the OS.
        Tensor-parallel ranks that each sample must pass the same seed to agree.
        grammars compiles the grammars of structured-output requests; without it they are refused."""
        self.vocab_size = vocab_size
        self.grammars = grammars
        self.eos_token_ids = list(eos_token_ids)
        self.device = torch.device(device)
        self._requests: dict[str, _Request] = {}
        self._pending: set[str] = set()  # requests whose grammar ready() has not waited for yet
        self._shared_generator = torch.Generator(self.device)
        if seed is None:
            self._shared_generator.seed()
        else:
            self._shared_generator.manual_seed(seed)
        self._seeded_generator = torch.Generator(self.device)  # reseeded for every seeded row
        self._seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=self.device)
        self._counts = torch.zeros(0, vocab_size, dtype=torch.float32, device=self.device)
        self._free_slots: list[int] = []

    # ------------------------------------------------------------------ request state

    def add_request(
        self,
        request_id: str,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int] = (),
    ) -> None:
        """Start tracking a request. output_token_ids is non-empty when a preempted request is
        rebuilt; sampling then continues exactly as if it had never left. Replaces any state
        already held under request_id. Raises ValueError for a logit_bias id outside the vocab."""
        self.remove_request(request_id)
        bad = [t for t in params.logit_bias if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids {bad} are outside the vocabulary (size {self.vocab_size})")
        min_tokens_ids: list[int] = []
        if params.min_tokens > 0:
            stops = set(params.stop_token_ids)
            if not params.ignore_eos:
                stops.update(self.eos_token_ids)
            min_tokens_ids = sorted(t for t in stops if 0 <= t < self.vocab_size)
        grammar = None
        if params.grammar is not None:
            if self.grammars is None:
                raise ValueError("this worker has no grammar engine: structured output is not served here")
            grammar = GrammarState(self.grammars.compile_async(params.grammar), output_token_ids)
            self._pending.add(request_id)
        slot = -1
        if params.needs_penalties:
            slot = self._allocate_slot()
            outputs = self._long(list(output_token_ids))
            self._counts[slot] = torch.bincount(outputs, minlength=self.vocab_size)
            self._seen[slot] = self._counts[slot] > 0
            self._seen[slot, self._long(list(prompt_token_ids))] = True
        self._requests[request_id] = _Request(
            params=params,
            num_outputs=len(output_token_ids),
            slot=slot,
            min_tokens_ids=min_tokens_ids,
            bias_ids=[int(t) for t in params.logit_bias],
            bias_values=[float(b) for b in params.logit_bias.values()],
            grammar=grammar,
        )

    def ready(self, request_ids: Sequence[str], wait_s: float = 0.0) -> tuple[set[str], dict[str, str]]:
        """Give each of these requests whose grammar has compiled a matcher that has seen its
        outputs so far. Each grammar began compiling on a thread of its own when its request
        arrived; they are waited for only when none of these requests could sample
        otherwise, and then at most wait_s in all, so a slow compile never holds up the
        batch. Returns (the requests still compiling: not to be sampled this step, the
        requests whose grammar failed, with the reason: they are forgotten)."""
        compiling: set[str] = set()
        failed: dict[str, str] = {}
        if not self._pending:  # the usual step: nothing to wait for, no work per request
            return compiling, failed
        if any(rid not in self._pending for rid in request_ids):
            wait_s = 0.0  # others can sample now: waiting would hold them up
        deadline = time.monotonic() + wait_s
        for rid in request_ids:
            if rid not in self._pending:
                continue
            try:
                if not self._requests[rid].grammar.finish_compile(deadline - time.monotonic()):
                    compiling.add(rid)
                    continue
            except ValueError as e:
                failed[rid] = str(e)
                self.remove_request(rid)
                continue
            self._pending.discard(rid)
        return compiling, failed

    def remove_request(self, request_id: str) -> None:
        """Forget a request (finished, aborted, or preempted). Unknown ids are ignored."""
        request = self._requests.pop(request_id, None)
        self._pending.discard(request_id)
        if request is not None and request.slot >= 0:
            self._free_slots.append(request.slot)

    def _allocate_slot(self) -> int:
        if not self._free_slots:
            old = self._seen.shape[0]
            new = max(8, 2 * old)
            self._seen = torch.cat([self._seen, self._seen.new_zeros(new - old, self.vocab_size)])
            self._counts = torch.cat([self._counts, self._counts.new_zeros(new - old, self.vocab_size)])
            self._free_slots.extend(range(new - 1, old - 1, -1))
        return self._free_slots.pop()

    # ------------------------------------------------------------------ sampling

    def sample(
        self, logits: Tensor, request_ids: list[str], proposals: Optional[list[Optional[Proposal]]] = None
    ) -> list[tuple[int, Optional[TokenLogprob]]]:
        """Sample one token per row. logits: [N, V] float32, row i belongs to request_ids[i]
        (each id at most once). Returns (token id, TokenLogprob or None) per row; the TokenLogprob
        is present when that request's params.logprobs is not None. Records every sampled token
        in its request's state, so each row must be a real next token of its request.
        proposals[i], when given for an unseeded random row, is a draft model's token and the
        distribution it was drawn from: the row then rejection-samples (_rejection_sample)."""
        n, vocab = logits.shape
        if vocab != self.vocab_size or len(request_ids) != n:
            raise ValueError(
                f"logits {tuple(logits.shape)} do not match {len(request_ids)} requests x vocab {self.vocab_size}"
            )
        requests = [self._requests[r] for r in request_ids]
        if self._pending and any(r in self._pending for r in request_ids):
            raise ValueError("sample() before ready(): a request's grammar has not been waited for")
        adjusted = self._adjust(logits, requests)  # [N, V]
        tokens = self._choose(adjusted, requests, proposals)  # [N] long
        logprobs = self._sampled_logprobs(logits, tokens, requests)
        self._record(tokens, requests)
        return list(zip(tokens.tolist(), logprobs))

    def verify(
        self,
        logits: Tensor,
        request_ids: list[str],
        drafts: list[list[int]],
        draft_probs: Optional[list[Optional[Tensor]]] = None,
    ) -> list[list[tuple[int, Optional[TokenLogprob]]]]:
        """Speculative decoding. Request i owns 1 + len(drafts[i]) consecutive rows of logits
        (in request order); its row j predicts the token after its first j drafts. Rows are
        sampled one position at a time, exactly as sequential decoding would sample them: row
        j is sampled as output token num_outputs + j, with the drafts before it counted as
        outputs (seeds, penalties, min_tokens). A request stops at its first sample that
        differs from its draft. For a draft proposed with certainty (n-gram lookup) that is
        exact rejection sampling: the draft is kept with probability p(draft), and otherwise
        the sample is drawn from p without the draft. Greedy and seeded requests therefore get
        the very tokens they would get without drafts.
        draft_probs[i] ([len(drafts[i]), V]), for an unseeded random request whose drafts a
        draft model sampled: row j is the distribution draft j was drawn from, and position j
        keeps the draft with probability min(1, p/q) (standard speculative sampling).
        Returns, per request, the accepted drafts and then one sampled token, with logprobs."""
        starts, row = [], 0
        for d in drafts:
            starts.append(row)
            row += 1 + len(d)
        if row != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logits rows for {row} positions")
        if row == len(request_ids):  # no drafts: one plain sample each
            return [[picked] for picked in self.sample(logits, request_ids)]
        probs = draft_probs or [None] * len(request_ids)
        out: list[list[tuple[int, Optional[TokenLogprob]]]] = [[] for _ in request_ids]
        alive, j = list(range(len(request_ids))), 0
        while alive:
            rows = logits[self._long([starts[i] + j for i in alive])]
            proposals = [
                Proposal(drafts[i][j], probs[i][j]) if probs[i] is not None and j < len(drafts[i]) else None
                for i in alive
            ]
            picked = self.sample(rows, [request_ids[i] for i in alive], proposals)
            still = []
            for i, (token, logprob) in zip(alive, picked):
                out[i].append((token, logprob))
                if j < len(drafts[i]) and token == drafts[i][j]:
                    still.append(i)
            alive, j = still, j + 1
        return out

    def propose(self, logits: Tensor, request_ids: list[str], index: int) -> tuple[list[int], list[Optional[Tensor]]]:
        """A draft model's token for each row of logits ([N, V]), to be output token
        num_outputs + index of its request. Greedy rows take the argmax. Random rows sample
        from the temperature / top-k / top-p / min-p distribution of the draft's logits
        (penalties and grammars are left to verification); a seeded row uses the very noise
        its target sample at that index will use, so a draft close to the target is usually
        the token the target picks. Returns the tokens and, for unseeded random rows (the
        ones verify() rejection-samples), the distribution q ([V]) each was drawn from.
        Changes no request state."""
        requests = [self._requests[r] for r in request_ids]
        tokens = _argmax(logits)
        q: list[Optional[Tensor]] = [None] * len(requests)
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if random_rows:
            randoms = [requests[i] for i in random_rows]
            probs = self._probs(logits[self._long(random_rows)], [r.params for r in randoms])
            noise = self._exponential_noise(randoms, vocab=probs.shape[1], offset=index)
            tokens[self._long(random_rows)] = _argmax(probs / noise)
            for row, i in enumerate(random_rows):
                if requests[i].params.seed is None:
                    q[i] = probs[row]
        return tokens.tolist(), q

    def prompt_logprobs(self, logits: Tensor, target_token_ids: Tensor, num_top: int) -> list[TokenLogprob]:
        """Logprob and rank of each target under the raw logits, with the num_top most likely
        alternatives. logits: [M, V] float32, row i predicts target_token_ids[i] ([M])."""
        targets = target_token_ids.to(device=logits.device, dtype=torch.long)
        out: list[TokenLogprob] = []
        for start in range(0, logits.shape[0], _PROMPT_LOGPROBS_CHUNK):
            chunk = slice(start, start + _PROMPT_LOGPROBS_CHUNK)
            logprobs = logits[chunk].log_softmax(-1)
            out += _token_logprobs(logprobs, targets[chunk], [num_top] * logprobs.shape[0])
        return out

    def _adjust(self, logits: Tensor, requests: list[_Request]) -> Tensor:
        """Steps 1-3: logit_bias, min_tokens bans, penalties. Returns logits itself when no row
        needs any of them, otherwise a new tensor ([N, V])."""
        bias_rows, bias_ids, bias_values = [], [], []
        ban_rows, ban_ids = [], []
        penalty_rows = []
        for i, r in enumerate(requests):
            if r.bias_ids:
                bias_rows += [i] * len(r.bias_ids)
                bias_ids += r.bias_ids
                bias_values += r.bias_values
            if r.num_outputs < r.params.min_tokens and r.min_tokens_ids:
                ban_rows += [i] * len(r.min_tokens_ids)
                ban_ids += r.min_tokens_ids
            if r.slot >= 0:
                penalty_rows.append(i)
        x = logits
        if bias_rows or ban_rows:
            x = logits.clone()
            if bias_rows:
                x.index_put_((self._long(bias_rows), self._long(bias_ids)), self._float(bias_values), accumulate=True)
            if ban_rows:
                x.index_put_((self._long(ban_rows), self._long(ban_ids)), self._float([float("-inf")]))
        if penalty_rows:
            penalized = [requests[i] for i in penalty_rows]
            x = _map_rows(x, penalty_rows, lambda rows: self._penalize(rows, penalized))
        grammar_rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        if grammar_rows:
            states = [requests[i].grammar for i in grammar_rows]
            x = mask_by_grammar(x.clone() if x is logits else x, grammar_rows, states, self.eos_token_ids)
        return x

    def _penalize(self, x: Tensor, requests: list[_Request]) -> Tensor:
        """x: [P, V] logits of requests that have penalties; returns new [P, V]."""
        slots = self._long([r.slot for r in requests])
        params = [r.params for r in requests]
        if any(p.repetition_penalty != 1.0 for p in params):
            penalty = self._column([p.repetition_penalty for p in params])
            x = torch.where(self._seen[slots], torch.where(x > 0, x / penalty, x * penalty), x)
        frequency = [p.frequency_penalty for p in params]
        presence = [p.presence_penalty for p in params]
        if any(frequency) or any(presence):
            counts = self._counts[slots]  # [P, V]
            x = x - self._column(frequency) * counts - self._column(presence) * (counts > 0)
        return x

    def _choose(self, x: Tensor, requests: list[_Request], proposals: Optional[list[Optional[Proposal]]]) -> Tensor:
        """Step 4 for every row of x [N, V]: argmax for greedy rows, a sample for the rest."""
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if not random_rows:
            return _argmax(x)
        randoms = [requests[i] for i in random_rows]
        offered = [proposals[i] for i in random_rows] if proposals else None
        if len(random_rows) == len(requests):
            return self._sample_random(x, randoms, offered)
        greedy_rows = self._long([i for i, r in enumerate(requests) if r.params.greedy])
        rows = self._long(random_rows)
        tokens = torch.empty(len(requests), dtype=torch.long, device=x.device)
        tokens[greedy_rows] = _argmax(x[greedy_rows])
        tokens[rows] = self._sample_random(x[rows], randoms, offered)
        return tokens

    def _sample_random(
        self, x: Tensor, requests: list[_Request], proposals: Optional[list[Optional[Proposal]]] = None
    ) -> Tensor:
        """x: [R, V] adjusted logits of non-greedy requests -> [R] sampled token ids."""
        probs = self._probs(x, [r.params for r in requests])
        checked = [
            i for i, r in enumerate(requests) if proposals and proposals[i] is not None and r.params.seed is None
        ]
        if not checked:
            return _argmax(probs / self._exponential_noise(requests, vocab=x.shape[1]))
        # Rows with a draft model's proposal are rejection-sampled; only the rest draw noise.
        tokens = torch.empty(len(requests), dtype=torch.long, device=probs.device)
        kept = set(checked)
        plain = [i for i in range(len(requests)) if i not in kept]
        if plain:
            rows = self._long(plain)
            noise = self._exponential_noise([requests[i] for i in plain], vocab=x.shape[1])
            tokens[rows] = _argmax(probs[rows] / noise)
        index = self._long(checked)
        drafted = self._long([proposals[i].token for i in checked])
        q = torch.stack([proposals[i].probs for i in checked]).to(probs.device)
        tokens[index] = self._rejection_sample(probs[index], q, drafted)
        return tokens

    def _rejection_sample(self, p: Tensor, q: Tensor, drafted: Tensor) -> Tensor:
        """Speculative sampling (Leviathan et al., Chen et al.): p, q [R, V] the target's and
        the draft's distributions, drafted [R] tokens drawn from q. Keeps a draft with
        probability min(1, p/q), else draws from the residual max(0, p - q) normalized, so the
        result is distributed as p whatever q is. Returns [R] token ids."""
        p_d = p.gather(-1, drafted[:, None])[:, 0]
        q_d = q.gather(-1, drafted[:, None])[:, 0]
        u = torch.rand(p.shape[0], generator=self._shared_generator, device=self.device)
        keep = u * q_d < p_d  # u < p/q without dividing by a q that rounds to 0
        residual = (p - q).clamp_min_(0.0)
        # p == q to rounding leaves no residual; then the draft is kept (p_d >= q_d) anyway.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
        noise = torch.empty_like(p).exponential_(generator=self._shared_generator).clamp_min_(torch.finfo(p.dtype).tiny)
        return torch.where(keep, drafted, _argmax(residual / noise))

    def _probs(self, x: Tensor, params: list[SamplingParams]) -> Tensor:
        """The distribution a random row samples from: x [R, V] logits -> [R, V] probabilities
        after temperature, top_k, top_p and min_p."""
        x = x / self._column([p.temperature for p in params])
        truncated = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
        if truncated:
            top_k = [params[i].top_k for i in truncated]
            top_p = [params[i].top_p for i in truncated]
            x = _map_rows(x, truncated, lambda rows: self._top_k_top_p(rows, top_k, top_p))
        min_p_rows = [i for i, p in enumerate(params) if p.min_p > 0.0]
        if min_p_rows:
            min_p = self._column([params[i].min_p for i in min_p_rows])
            # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed.
            x = _map_rows(
                x,
                min_p_rows,
                lambda rows: rows.masked_fill(rows < rows.amax(-1, keepdim=True) + min_p.log(), float("-inf")),
            )
        return x.softmax(-1)

    def _top_k_top_p(self, x: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
        """x: [T, V] temperature-scaled logits -> new [T, V] with tokens outside the top_k, then
        outside the top_p nucleus of what is left, set to -inf. top_k 0 / top_p 1 disable."""
        vocab = x.shape[1]
        k = self._long([min(t, vocab) if t > 0 else vocab for t in top_k])
        sorted_x, order = x.sort(-1, descending=True)  # [T, V]
        cut = torch.arange(vocab, device=x.device) >= k[:, None]  # [T, V] beyond top-k
        sorted_x.masked_fill_(cut, float("-inf"))
        if any(t < 1.0 for t in top_p):
            # inf, not 1.0, disables top_p: a float32 cumsum can reach 1.0 before the last token.
            p = self._column([t if t < 1.0 else float("inf") for t in top_p])
            probs = sorted_x.softmax(-1)
            mass_before = probs.cumsum(-1) - probs  # probability of all more likely tokens
            sorted_x.masked_fill_(mass_before >= p, float("-inf"))  # position 0 always stays
        return torch.empty_like(x).scatter_(-1, order, sorted_x)

    def _exponential_noise(self, requests: list[_Request], vocab: int, offset: int = 0) -> Tensor:
        """[R, V] of Exp(1) draws: a seeded row's come from (seed, index of the token being
        sampled: its num_outputs + offset), the others from the shared generator."""
        q = torch.empty(len(requests), vocab, device=self.device)
        seeded = [i for i, r in enumerate(requests) if r.params.seed is not None]
        if not seeded:
            q.exponential_(generator=self._shared_generator)
        elif len(seeded) < len(requests):
            unseeded = self._long([i for i, r in enumerate(requests) if r.params.seed is None])
            q[unseeded] = torch.empty(len(unseeded), vocab, device=self.device).exponential_(
                generator=self._shared_generator
            )
        for i in seeded:
            r = requests[i]
            self._seeded_generator.manual_seed(_mix_seed(r.params.seed, r.num_outputs + offset))
            q[i].exponential_(generator=self._seeded_generator)
        # exponential_ can return exactly 0; p / 0 would be inf (or nan for a banned token).
        return q.clamp_min_(torch.finfo(q.dtype).tiny)

    def _sampled_logprobs(
        self, logits: Tensor, tokens: Tensor, requests: list[_Request]
    ) -> list[Optional[TokenLogprob]]:
        rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        out: list[Optional[TokenLogprob]] = [None] * len(requests)
        if not rows:
            return out
        if len(rows) < len(requests):
            index = self._long(rows)
            logits, tokens = logits[index], tokens[index]
        entries = _token_logprobs(logits.log_softmax(-1), tokens, [requests[i].params.logprobs for i in rows])
        for i, entry in zip(rows, entries):
            out[i] = entry
        return out

    def _record(self, tokens: Tensor, requests: list[_Request]) -> None:
        """Keeps the invariants: count each sampled token as an output of its request."""
        penalty_rows = [i for i, r in enumerate(requests) if r.slot >= 0]
        if penalty_rows:
            slots = self._long([requests[i].slot for i in penalty_rows])
            sampled = tokens[self._long(penalty_rows)]
            self._counts.index_put_((slots, sampled), self._float([1.0]), accumulate=True)
            self._seen[slots, sampled] = True
        for r in requests:
            r.num_outputs += 1
        if not any(r.grammar is not None for r in requests):
            return
        for r, token in zip(requests, tokens.tolist()):
            if r.grammar is not None:
                r.grammar.accept(token)

    # ------------------------------------------------------------------ small tensor helpers

    def _long(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _float(self, values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _column(self, values: list[float]) -> Tensor:
        return self._float(values)[:, None]


def _map_rows(x: Tensor, rows: list[int], fn: Callable[[Tensor], Tensor]) -> Tensor:
    """New [N, V] tensor: fn ([R, V] -> [R, V]) applied to the given rows of x, the rest copied.
    Skips the gather and scatter when rows cover all of x."""
    if len(rows) == x.shape[0]:
        return fn(x)
    index = torch.tensor(rows, dtype=torch.long, device=x.device)
    return x.index_copy(0, index, fn(x[index]))


def _token_logprobs(logprobs: Tensor, token_ids: Tensor, num_tops: list[int]) -> list[TokenLogprob]:
    """logprobs: [L, V] log_softmax rows; token_ids: [L]. Row i gets token_ids[i]'s logprob,
    its rank (1 + count of strictly more likely tokens) and the num_tops[i] most likely tokens."""
    chosen = logprobs.gather(-1, token_ids[:, None])  # [L, 1]
    ranks = (logprobs > chosen).sum(-1) + 1  # [L]
    top_values, top_ids = logprobs.topk(min(max(num_tops), logprobs.shape[1]), dim=-1)  # [L, K]
    rows = zip(
        token_ids.tolist(), chosen[:, 0].tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist(), num_tops
    )
    return [
        TokenLogprob(token_id=t, logprob=lp, rank=rank, top=list(zip(ids[:k], values[:k])))
        for t, lp, rank, ids, values, k in rows
    ]


def _mix_seed(seed: int, index: int) -> int:
    """A 64-bit generator seed for output token `index` of a request with `seed` (splitmix64, so
    nearby (seed, index) pairs give unrelated streams)."""
    z = (seed * 0x9E3779B97F4A7C15 + index) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _argmax(x: Tensor) -> Tensor:
    """x.argmax(-1), by max: the same index (the first maximal one, a NaN's where there
    is one), and on CPU a third of the time over a vocabulary-wide row (195 against 572
    us for 16 rows of 49,152: torch's CPU argmax reduction is not vectorised as max's is)."""
    return x.max(-1).indices
