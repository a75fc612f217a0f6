"""Request metrics of the head, rendered in the Prometheus text format.

The replicas' step loops observe latencies as outputs leave the scheduler (so
HTTP and detokenization time are not included); gauges such as KV usage are
read from each replica's scheduler when /metrics is scraped. Everything runs
on the head's event loop, so no locks.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Optional

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


@dataclass
class Histogram:
    name: str
    help: str
    bounds: tuple[float, ...] = _LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)    # per bucket, not cumulative; last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        running = 0
        for bound, c in zip(self.bounds, self.counts):
            running += c
            yield f'{self.name}_bucket{{le="{bound}"}} {running}'
        yield f'{self.name}_bucket{{le="+Inf"}} {self.count}'
        yield f"{self.name}_sum {self.total}"
        yield f"{self.name}_count {self.count}"


@dataclass
class RequestMetrics:
    """Histograms and counters over all replicas, since the server started."""
    ttft: Histogram = field(default_factory=lambda: Histogram(
        "folio_time_to_first_token_seconds", "Arrival to first output token."))
    itl: Histogram = field(default_factory=lambda: Histogram(
        "folio_inter_token_latency_seconds", "Time between consecutive output tokens of a request."))
    e2e: Histogram = field(default_factory=lambda: Histogram(
        "folio_e2e_request_latency_seconds", "Arrival to last output token."))
    queue_time: Histogram = field(default_factory=lambda: Histogram(
        "folio_request_queue_time_seconds", "Arrival to the first step that computes the request."))
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)    # by finish reason
    rejected: int = 0                                         # admission queue full
    resumed: int = 0                                          # moved off a failed replica

    def histograms(self) -> tuple[Histogram, ...]:
        return (self.ttft, self.itl, self.e2e, self.queue_time)


@dataclass(frozen=True)
class ReplicaGauges:
    """What /metrics shows per replica, read from its scheduler at scrape time."""
    index: int
    alive: bool
    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    prefix_hit_rate: float
    num_preemptions: int
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


def render(metrics: RequestMetrics, replicas: list[ReplicaGauges], num_queued: int,
           routing: Optional[dict[tuple[int, str], int]] = None) -> str:
    """The Prometheus text exposition of everything above.

    routing: requests routed per (replica index, reason), from cluster/routing.py.
    """
    lines: list[str] = []
    for h in metrics.histograms():
        lines.extend(h.render())
    lines.extend(_family("folio_prompt_tokens_total", "counter", "Prompt tokens processed.",
                         [("", metrics.prompt_tokens)]))
    lines.extend(_family("folio_generation_tokens_total", "counter", "Output tokens generated.",
                         [("", metrics.generation_tokens)]))
    lines.extend(_family("folio_request_success_total", "counter", "Finished requests by reason.",
                         [(f'{{finished_reason="{k}"}}', v) for k, v in sorted(metrics.finished.items())]))
    lines.extend(_family("folio_request_rejected_total", "counter",
                         "Requests refused because the admission queue was full.",
                         [("", metrics.rejected)]))
    lines.extend(_family("folio_request_resumed_total", "counter",
                         "Requests resumed on another replica after theirs failed.",
                         [("", metrics.resumed)]))
    lines.extend(_family("folio_num_requests_queued", "gauge",
                         "Requests in the head's admission queue, not yet bound to a replica.",
                         [("", num_queued)]))
    per_replica = [
        ("folio_replica_up", "1 while the replica serves, 0 once it has failed.", lambda g: int(g.alive)),
        ("folio_num_requests_running", "Requests in the replica's running batch.", lambda g: g.num_running),
        ("folio_num_requests_waiting", "Requests waiting in the replica's scheduler.", lambda g: g.num_waiting),
        ("folio_kv_cache_usage_perc", "Fraction of KV blocks in use (0 to 1).", lambda g: g.kv_usage),
        ("folio_kv_cache_free_blocks", "KV blocks not held by any request.", lambda g: g.num_free_blocks),
        ("folio_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens.",
         lambda g: g.prefix_hit_rate),
        ("folio_num_preemptions_total", "Requests preempted for lack of KV blocks.", lambda g: g.num_preemptions),
        ("folio_spec_decode_draft_tokens_total", "Speculative draft tokens proposed for verification.",
         lambda g: g.num_draft_tokens),
        ("folio_spec_decode_accepted_tokens_total", "Speculative draft tokens the model accepted.",
         lambda g: g.num_accepted_tokens),
    ]
    for name, help, value in per_replica:
        kind = "counter" if name.endswith("_total") else "gauge"
        lines.extend(_family(name, kind, help, [(f'{{replica="{g.index}"}}', value(g)) for g in replicas]))
    lines.extend(_family("folio_routing_decisions_total", "counter",
                         "Requests routed to each replica, by why: affinity (it held part of the "
                         "prompt's prefix) or load.",
                         [(f'{{replica="{i}",reason="{reason}"}}', n)
                          for (i, reason), n in sorted((routing or {}).items())]))
    return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help: str, samples: Iterable[tuple[str, float]]) -> Iterable[str]:
    yield f"# HELP {name} {help}"
    yield f"# TYPE {name} {kind}"
    for labels, value in samples:
        yield f"{name}{labels} {value}"
