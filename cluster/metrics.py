"""Request metrics of the head, exposed in the Prometheus text format by prometheus_client.

The replicas' step loops observe latencies as outputs leave the scheduler (so
HTTP and detokenization time are not included); gauges such as KV usage are
read from each replica's scheduler when /metrics is scraped. Everything runs
on the head's event loop, so no locks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from folio.cluster.scheduler import SchedulerStats

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)


@dataclass
class Histogram:
    name: str
    help: str
    bounds: tuple[float, ...] = _LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


@dataclass
class RequestMetrics:
    """Histograms and counters over all replicas, since the server started."""

    ttft: Histogram = field(
        default_factory=lambda: Histogram("folio_time_to_first_token_seconds", "Arrival to first output token.")
    )
    itl: Histogram = field(
        default_factory=lambda: Histogram(
            "folio_inter_token_latency_seconds", "Time between consecutive output tokens of a request."
        )
    )
    e2e: Histogram = field(
        default_factory=lambda: Histogram("folio_e2e_request_latency_seconds", "Arrival to last output token.")
    )
    queue_time: Histogram = field(
        default_factory=lambda: Histogram(
            "folio_request_queue_time_seconds", "Arrival to the first step that computes the request."
        )
    )
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    rejected: int = 0  # admission queue full
    resumed: int = 0  # moved off a failed replica

    def histograms(self) -> tuple[Histogram, ...]:
        return (self.ttft, self.itl, self.e2e, self.queue_time)


def render(
    metrics: RequestMetrics,
    replicas: list[tuple[int, SchedulerStats]],
    down: list[int],
    num_queued: int,
    routing: Optional[dict[tuple[int, str], int]] = None,
) -> str:
    """The Prometheus text exposition, by prometheus_client, of a snapshot taken now.

    replicas: (index, its scheduler's stats) of each live replica; down: the indices of
    failed ones, shown as folio_replica_up 0 with no other gauges (their numbers mean
    nothing now). routing: requests routed per (replica index, reason), cluster/routing.py.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(list(_families(metrics, replicas, down, num_queued, routing or {}))))
    return generate_latest(registry).decode()


class _Snapshot(Collector):
    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return self.families


# (name, help, value from a replica's SchedulerStats); a name ending in _total is a counter.
_PER_REPLICA: tuple[tuple[str, str, Callable[[SchedulerStats], float]], ...] = (
    ("folio_num_requests_running", "Requests in the replica's running batch.", lambda s: s.num_running),
    ("folio_num_requests_waiting", "Requests waiting in the replica's scheduler.", lambda s: s.num_waiting),
    ("folio_kv_cache_usage_perc", "Fraction of KV blocks in use (0 to 1).", lambda s: s.kv_usage),
    ("folio_kv_cache_free_blocks", "KV blocks not held by any request.", lambda s: s.num_free_blocks),
    (
        "folio_prefix_cache_hit_rate",
        "Prompt tokens served from the prefix cache / prompt tokens.",
        lambda s: s.prefix_hit_rate,
    ),
    ("folio_num_preemptions_total", "Requests preempted for lack of KV blocks.", lambda s: s.num_preemptions),
    (
        "folio_spec_decode_draft_tokens_total",
        "Speculative draft tokens proposed for verification.",
        lambda s: s.num_draft_tokens,
    ),
    (
        "folio_spec_decode_accepted_tokens_total",
        "Speculative draft tokens the model accepted.",
        lambda s: s.num_accepted_tokens,
    ),
    (
        "folio_grammar_deferred_samples_total",
        "Steps in which a constrained request could not sample yet: its grammar was still compiling.",
        lambda s: s.num_deferred_samples,
    ),
)


def _families(
    metrics: RequestMetrics,
    replicas: list[tuple[int, SchedulerStats]],
    down: list[int],
    num_queued: int,
    routing: dict[tuple[int, str], int],
) -> Iterator:
    for h in metrics.histograms():
        running, buckets = 0, []
        for bound, c in zip(h.bounds, h.counts):
            running += c
            buckets.append((str(bound), running))
        yield HistogramMetricFamily(h.name, h.help, buckets=buckets + [("+Inf", h.count)], sum_value=h.total)
    yield CounterMetricFamily("folio_prompt_tokens_total", "Prompt tokens processed.", metrics.prompt_tokens)
    yield CounterMetricFamily("folio_generation_tokens_total", "Output tokens generated.", metrics.generation_tokens)
    finished = CounterMetricFamily(
        "folio_request_success_total", "Finished requests by reason.", labels=["finished_reason"]
    )
    for reason, n in sorted(metrics.finished.items()):
        finished.add_metric([reason], n)
    yield finished
    yield CounterMetricFamily(
        "folio_request_rejected_total", "Requests refused because the admission queue was full.", metrics.rejected
    )
    yield CounterMetricFamily(
        "folio_request_resumed_total", "Requests resumed on another replica after theirs failed.", metrics.resumed
    )
    yield GaugeMetricFamily(
        "folio_num_requests_queued", "Requests in the head's admission queue, not yet bound to a replica.", num_queued
    )
    up = GaugeMetricFamily("folio_replica_up", "1 while the replica serves, 0 once it has failed.", labels=["replica"])
    for i in down:
        up.add_metric([str(i)], 0)
    for i, _ in replicas:
        up.add_metric([str(i)], 1)
    yield up
    for name, help, value in _PER_REPLICA:
        kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
        family = kind(name, help, labels=["replica"])
        for i, stats in replicas:
            family.add_metric([str(i)], value(stats))
        yield family
    decisions = CounterMetricFamily(
        "folio_routing_decisions_total",
        "Requests routed to each replica, by why: affinity (it held part of the prompt's prefix) or load.",
        labels=["replica", "reason"],
    )
    for (i, reason), n in sorted(routing.items()):
        decisions.add_metric([str(i), reason], n)
    yield decisions
