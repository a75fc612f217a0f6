"""Replica choice for the global scheduler: prefix-cache affinity, round robin.

The head holds every replica's block manager, so "which replica has this
prompt's prefix cached" is an exact lookup, not a guess: hash the prompt's
full blocks (the same hash chain the scheduler uses) and ask each replica's
cached_prefix. Blocks a replica is computing right now count too: the
scheduler publishes a block when the step that computes it is scheduled.

A request routed but not yet scheduled (waiting in the replica's queue) has
its blocks in no cache yet; without counting it, a burst of requests sharing
a prefix would scatter. Its block keys are known on the head too, so they
count as well: the replica will hold that prefix by the time it runs.

Every policy is a RoutingPolicy (cluster/frontend.py): a callable
(replicas, request) -> replica; AffinityRouter also counts why it chose
(`decisions`, on /metrics as folio_routing_decisions_total).
"""

from __future__ import annotations

import itertools
from typing import Sequence

from folio.cluster.block_manager import hash_blocks, reusable_blocks, salt_root
from folio.cluster.frontend import RoutingPolicy, least_loaded
from folio.cluster.replica import Replica
from folio.protos.messages import EngineRequest


def load_tokens(replica: Replica) -> int:
    """Work a replica still has, in tokens: uncomputed prompt plus remaining output of each request."""
    return replica.scheduler.load_tokens() if replica.scheduler is not None else 0


class _Counting:
    """Counts decisions per (replica index, reason): folio_routing_decisions_total."""

    def __init__(self) -> None:
        self.decisions: dict[tuple[int, str], int] = {}

    def _count(self, replica: Replica, reason: str) -> Replica:
        key = (replica.index, reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        return replica


class AffinityRouter(_Counting):
    """Send a request where most of its prompt is cached, unless that replica is much busier.

    Each replica scores hit_tokens - load_weight * load_tokens; the best score
    wins (ties: less load, then lower index). load_weight is how many tokens of
    queued work one cached prompt token is worth: at 0.25 a 512-token cached
    prefix outweighs 2048 tokens of extra queued work, after which load wins.
    """

    def __init__(self, block_size: int, load_weight: float = 0.25):
        super().__init__()
        self.block_size = block_size
        self.load_weight = load_weight

    def __call__(self, replicas: Sequence[Replica], request: EngineRequest) -> Replica:
        prompt = request.prompt_token_ids
        keys = hash_blocks(
            prompt[: reusable_blocks(len(prompt), self.block_size) * self.block_size],
            self.block_size,
            parent=salt_root(request.cache_salt),
        )
        best, best_key, best_hit = None, None, 0
        for r in replicas:
            hit = r.scheduler.prefix_hit_blocks(keys) * self.block_size if r.scheduler is not None else 0
            load = load_tokens(r)
            key = (hit - self.load_weight * load, -load, -r.index)
            if best is None or key > best_key:
                best, best_key, best_hit = r, key, hit
        return self._count(best, "affinity" if best_hit > 0 else "load")


class RoundRobinRouter(_Counting):
    """Replicas in turn, blind to cache and load: the baseline affinity is measured against."""

    def __init__(self) -> None:
        super().__init__()
        self._turn = itertools.count()

    def __call__(self, replicas: Sequence[Replica], request: EngineRequest) -> Replica:
        return self._count(replicas[next(self._turn) % len(replicas)], "load")


class LeastLoadedRouter(_Counting):
    """folio.cluster.frontend.least_loaded, counted."""

    def __call__(self, replicas: Sequence[Replica], request: EngineRequest) -> Replica:
        return self._count(least_loaded(replicas, request), "load")


ROUTING_POLICIES = ("affinity", "round-robin", "least-loaded")


def make_router(name: str, block_size: int) -> RoutingPolicy:
    """A fresh router by its --routing name (ROUTING_POLICIES)."""
    if name == "affinity":
        return AffinityRouter(block_size)
    if name == "round-robin":
        return RoundRobinRouter()
    if name == "least-loaded":
        return LeastLoadedRouter()
    raise ValueError(f"unknown routing policy {name!r}; choose from {', '.join(ROUTING_POLICIES)}")
