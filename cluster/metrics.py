"""Request metrics of the head, rendered in the Prometheus text format.

The replicas' step loops observe latencies as outputs leave the scheduler (so
HTTP and detokenization time are not included); gauges such as KV usage are
read from each replica's scheduler when /metrics is scraped. Everything runs
on the head's event loop, so no locks.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable

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

    def histograms(self) -> tuple[Histogram, ...]:
        return (self.ttft, self.itl, self.e2e, self.queue_time)


def counter(name: str, help: str, value: float, labels: str = "") -> Iterable[str]:
    yield f"# HELP {name} {help}"
    yield f"# TYPE {name} counter"
    yield f"{name}{labels} {value}"


def gauge(name: str, help: str, samples: Iterable[tuple[str, float]]) -> Iterable[str]:
    """One gauge with a sample per label set (e.g. one per replica)."""
    yield f"# HELP {name} {help}"
    yield f"# TYPE {name} gauge"
    for labels, value in samples:
        yield f"{name}{labels} {value}"
