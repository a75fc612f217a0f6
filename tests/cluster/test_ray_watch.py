"""ClusterWatch: one lost verdict after grace_s of failed probes, none while probes recover."""

from __future__ import annotations

import time

from folio.cluster.ray_watch import ClusterWatch, WatchConfig

FAST = WatchConfig(interval_s=0.01, probe_timeout_s=0.01, grace_s=0.1)


def _run(answers, seconds: float) -> tuple[list, ClusterWatch]:
    calls = []

    it = iter(answers)
    w = ClusterWatch(calls.append, FAST, probe=lambda t: next(it, "gone"))
    w.start()
    time.sleep(seconds)
    w.stop()
    return calls, w


def test_lost_once_after_grace():
    calls, w = _run([None, None], 1.0)
    assert calls == ["gone"] and w.lost == "gone"


def test_a_probe_that_recovers_resets_the_grace():
    flaky = (["blip"] * 3 + [None]) * 100  # each failure run is shorter than grace_s
    calls, w = _run(flaky, 0.5)
    assert calls == [] and w.lost is None
