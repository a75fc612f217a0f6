"""Faults stay as small as what holds them (issue 10).

A bad request fails alone (the worker refuses it, or it cannot be encoded for
the wire) while the replica and its other requests go on. A worker whose step
never returns (SIGSTOP) fails its replica within the step deadline and its
requests resume elsewhere with the tokens an unbroken run gives; a killed
worker's replica is released and replaced while the head keeps serving; when
every worker is gone the head recovers by itself.

The first tests run worker processes behind real gRPC; the rest run the whole
deployment (`folio serve` in the background: Ray on 127.0.0.1, placement groups,
worker actors, uvicorn) on a tiny random-weight model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest

from folio.cluster.frontend import Frontend
from folio.cluster.metrics import RequestMetrics
from folio.cluster.replica import Replica
from folio.cluster.scheduler import Scheduler
from folio.protos import worker_pb2 as pb
from folio.protos.config import SchedulerConfig
from folio.protos.messages import EngineRequest, SamplingParams, StepResult
from folio.router.engine_client import NotReady, RequestFailed
from tests.model_fixtures import make_tiny_model
from tests.worker_processes import CREDENTIALS, WorkerProcesses

PROMPT = [5, 6, 7, 8, 9, 10, 11]
SEEDED = SamplingParams(temperature=0.9, seed=3, frequency_penalty=0.4, max_tokens=40, ignore_eos=True)


async def _tokens(stream) -> list[int]:
    return [t async for out in stream for t in out.new_token_ids]


async def _failure(stream) -> RequestFailed:
    with pytest.raises(RequestFailed) as e:
        await _tokens(stream)
    return e.value


# ---------------------------------------------------------------- one request fails alone


def test_scheduler_forgets_a_failed_request_and_tells_the_worker_nothing():
    sched = Scheduler(SchedulerConfig(block_size=4, max_model_len=64, max_num_seqs=4), num_blocks=16)
    for rid in ("bad", "good"):
        sched.add_request(EngineRequest(rid, PROMPT, SamplingParams(max_tokens=4)))
    step = sched.schedule()
    assert {r.request_id for r in step.new_requests} == {"bad", "good"}
    assert sched.fail_requests(["bad", "unknown"]) == ["bad"]
    assert "bad" not in sched.requests and sched.blocks.num_free == 16 - 2
    sched.update_from_output(step, StepResult(step.step_id))
    sched.check_integrity()
    assert sched.schedule().finished_ids == []  # the worker does not hold it


@pytest.mark.slow
def test_a_poison_request_fails_alone_and_the_replica_goes_on(tiny_model):
    """One request the worker refuses (a logit_bias key outside the vocabulary, reported
    in StepResult.errors) and one the head cannot encode (a seed beyond int64) share
    a step with a good request: both fail alone, not retryable; the good one finishes
    with the tokens it has alone; the replica lives and holds no block afterwards."""
    with WorkerProcesses(1) as addresses:

        async def main():
            metrics = RequestMetrics()
            replica = Replica(
                0, addresses, SchedulerConfig(block_size=16, max_num_seqs=8), metrics, credentials=CREDENTIALS
            )
            await replica.start(
                pb.LoadModelRequest(
                    model_path=tiny_model("llama"), block_size=16, num_blocks=64, dtype="float32", device="cpu"
                )
            )
            try:
                fe = Frontend([replica], metrics)
                want = await _tokens(fe.generate(EngineRequest("alone", PROMPT, SEEDED)))
                good = fe.generate(EngineRequest("good", PROMPT, SEEDED))
                refused = fe.generate(
                    EngineRequest("refused", PROMPT, SamplingParams(max_tokens=5, logit_bias={1000: 5.0}))
                )
                unsendable = fe.generate(EngineRequest("unsendable", PROMPT, SamplingParams(max_tokens=5, seed=2**63)))
                got, refused_e, unsendable_e = await asyncio.wait_for(
                    asyncio.gather(_tokens(good), _failure(refused), _failure(unsendable)), 60
                )
                after = await _tokens(fe.generate(EngineRequest("after", PROMPT, SEEDED)))
                replica.scheduler.check_integrity()
                return dict(
                    want=want,
                    got=got,
                    after=after,
                    refused=refused_e,
                    unsendable=unsendable_e,
                    alive=replica.alive,
                    resumed=metrics.resumed,
                    idle=replica.num_unfinished == 0,
                )
            finally:
                await replica.close()

        r = asyncio.run(main())
    assert r["alive"] and r["idle"] and r["resumed"] == 0
    assert len(r["want"]) == 40 and r["got"] == r["want"] and r["after"] == r["want"]
    assert not r["refused"].retryable and "refused" in str(r["refused"]) and "1000" in str(r["refused"])
    assert not r["unsendable"].retryable and "cannot be sent" in str(r["unsendable"])


# ---------------------------------------------------------------- the whole deployment


@pytest.fixture(scope="module")
def served_model(model_dir):
    """The tiny random Llama with a byte-level tokenizer of its own (ids 3..258 spell
    bytes), so `folio serve` runs it without SmolLM2's slow GGUF tokenizer."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    out = make_tiny_model("llama", os.path.join(str(model_dir), "served"))
    if not os.path.isfile(os.path.join(out, "tokenizer_config.json")):
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
        tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
        tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        PreTrainedTokenizerFast(
            tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if not ray.is_initialized():
        from folio.cluster.placement import start_local_ray

        start_local_ray()


def _serve(model: str, **flags):
    from folio.cluster.entrypoints.options import build_config
    from folio.cluster.entrypoints.serve import ServeConfig, serve_in_background

    return serve_in_background(
        build_config(
            ServeConfig,
            model=model,
            port=0,
            replicas=2,
            device="cpu",
            cpus_per_worker=1,
            num_kv_blocks=64,
            max_num_seqs=8,
            **flags,
        )
    )


def _worker_pids(bg) -> dict[int, int]:
    """Replica index -> its worker's process id, asked of the Ray actor."""
    import ray

    handles = bg.call(_async(lambda: list(bg.deployment.handles)))
    return {h.replica.index: ray.get(h.actors[0].__ray_call__.remote(lambda actor: os.getpid())) for h in handles}


def _async(fn):
    async def run():
        return fn()

    return run()


def _live_indices(bg) -> set[int]:
    return bg.call(_async(lambda: {r.index for r in bg.deployment.frontend.live_replicas}))


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()
    except FileNotFoundError:
        return True


def _placement_groups() -> int:
    """Placement groups Ray holds for folio replicas now."""
    from ray.util import placement_group_table

    return sum(
        1
        for pg in placement_group_table().values()
        if pg["name"].startswith("folio-") and "-replica-" in pg["name"] and pg["state"] == "CREATED"
    )


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_a_frozen_worker_fails_its_replica_within_the_step_deadline(served_model, local_ray):
    """SIGSTOP under load, two replicas, --step-timeout 3: the frozen replica gets no new
    request once overdue, fails at the deadline (well before gRPC's own ping timeout),
    its requests finish on the other replica with exactly an unbroken run's tokens, and
    a new replica replaces it through the placement path."""
    step_timeout = 3.0
    params = [
        SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=11, presence_penalty=0.5, max_tokens=60, ignore_eos=True),
    ]
    # Five full blocks each: "late" (prompts[0] again) would go where its prefix is cached.
    prompts = [[100 + i, 200 + i, 300 + i] * 30 for i in range(4)]
    frozen = []
    with _serve(served_model, step_timeout=step_timeout) as bg:
        fe = bg.deployment.frontend
        pids = _worker_pids(bg)

        def submit(tag):
            return [fe.generate(EngineRequest(f"{tag}{i}", p, params[i % 2])) for i, p in enumerate(prompts)]

        async def unbroken():
            return await asyncio.gather(*(_tokens(s) for s in submit("ref")))

        async def with_a_frozen_worker():
            streams = submit("run")
            victim = streams[0].replica
            first = await streams[0].__anext__()  # it runs: freeze its worker now
            frozen.append(pids[victim.index])
            _kill(frozen[0], signal.SIGSTOP)
            stopped = time.monotonic()
            collect = asyncio.gather(*(_tokens(s) for s in streams))
            await asyncio.sleep(step_timeout * 0.7)  # overdue (from half the deadline) but not failed
            late = fe.generate(EngineRequest("late", prompts[0], params[0]))
            late_replica, was_overdue = late.replica, victim.overdue
            while victim.alive:
                await asyncio.sleep(0.05)
            failed_after = time.monotonic() - stopped
            got = await asyncio.wait_for(collect, 60)
            got[0] = first.new_token_ids + got[0]
            await asyncio.wait_for(_tokens(late), 60)
            return dict(
                got=got,
                failed_after=failed_after,
                error=victim.error,
                victim=victim.index,
                late_on_victim=late_replica is victim,
                was_overdue=was_overdue,
                resumed=fe.metrics.resumed,
            )

        try:
            want = bg.call(unbroken(), timeout=120)
            r = bg.call(with_a_frozen_worker(), timeout=120)
            assert r["was_overdue"] and not r["late_on_victim"]
            assert "step deadline" in r["error"], r["error"]
            # The deadline counts from the step's start, a moment before the SIGSTOP.
            assert step_timeout - 0.5 <= r["failed_after"] <= step_timeout + 1.5, r["failed_after"]
            assert r["resumed"] >= 1
            assert r["got"] == want and all(len(t) == 60 for t in want)
            _wait_for(
                lambda: len(_live_indices(bg)) == 2 and r["victim"] not in _live_indices(bg),
                120,
                "a replacement replica",
            )
            after = bg.call(_tokens(fe.generate(EngineRequest("after", prompts[1], params[1]))), 60)
            assert after == want[1]
            # What the failed replica held is released: its worker process and its devices.
            _wait_for(lambda: _gone(frozen[0]), 30, "the frozen worker to be killed")
            _wait_for(lambda: _placement_groups() == 2, 30, "the failed replica's placement group to go")
        finally:
            for pid in frozen:
                _kill(pid, signal.SIGKILL)  # released replicas are killed by Ray; this one surely


class _HealthWatch:
    """GET /health and read Frontend.ready every 50 ms on a thread, recording every answer."""

    def __init__(self, bg):
        self.bg = bg
        self.codes: list[int] = []
        self.ready: list[bool] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.bg.base_url, timeout=10) as http:
            while not self._stop.is_set():
                self.codes.append(http.get("/health").status_code)
                self.ready.append(self.bg.call(_async(lambda: self.bg.deployment.frontend.ready)))
                time.sleep(0.05)

    def __enter__(self) -> "_HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.slow
def test_killed_workers_are_replaced_and_the_head_recovers_by_itself(served_model, local_ray):
    """Default flags (no autoscaling, the default deadline). One worker SIGKILLed: its
    replica is released and replaced while the other serves, /health 200 and
    Frontend.ready throughout. Then every worker killed: NotReady with a Retry-After
    meanwhile, and a new replica serves without anyone's help."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with _serve(served_model) as bg:
        fe = bg.deployment.frontend
        want = bg.call(_tokens(fe.generate(EngineRequest("ref", PROMPT, params))), 60)

        pids = _worker_pids(bg)
        with _HealthWatch(bg) as watch:
            _kill(pids[0], signal.SIGKILL)
            _wait_for(lambda: 0 not in _live_indices(bg), 30, "the killed replica to fail")
            _wait_for(lambda: len(_live_indices(bg)) == 2, 120, "a replacement replica")
        assert len(watch.codes) > 10
        assert set(watch.codes) == {200} and all(watch.ready)

        pids = _worker_pids(bg)
        for pid in pids.values():
            _kill(pid, signal.SIGKILL)
        _wait_for(lambda: not bg.call(_async(lambda: fe.ready)), 30, "every replica to fail")

        async def refused():
            with pytest.raises(NotReady) as e:
                fe.generate(EngineRequest("early", PROMPT, params))
            return e.value.retry_after

        assert 1 <= bg.call(refused()) <= 60
        _wait_for(lambda: bg.call(_async(lambda: fe.ready)), 120, "the head to recover")
        assert not set(_live_indices(bg)) & set(pids)
        assert bg.call(_tokens(fe.generate(EngineRequest("after", PROMPT, params))), 60) == want


def test_a_start_ray_cannot_place_says_so_and_a_timed_out_start_releases_its_devices(
    served_model, local_ray, monkeypatch, caplog
):
    """A replica that needs more than the cluster has: the start logs what it waits for,
    and when serve_in_background gives up, the placement group is gone (a later server
    on this Ray would otherwise wait forever behind it). Two deployments never share a
    placement-group name."""
    import ray

    from folio.cluster import placement
    from folio.cluster.placement import ReplicaSpec

    monkeypatch.setattr(placement, "PLACEMENT_REPORT_S", 0.5)

    def held() -> int:  # folio replicas' placement groups, placed or waiting
        table = ray.util.placement_group_table().values()
        return sum(1 for pg in table if "-replica-" in pg["name"] and pg["state"] != "REMOVED")

    before = held()
    too_many = int(ray.cluster_resources()["CPU"]) + 1
    with caplog.at_level("WARNING", logger="folio.cluster.placement"):
        with pytest.raises(TimeoutError, match="did not start within 3 s"):
            from folio.cluster.entrypoints.options import build_config
            from folio.cluster.entrypoints.serve import ServeConfig, serve_in_background

            cfg = build_config(ServeConfig, model=served_model, port=0, device="cpu", cpus_per_worker=too_many)
            with serve_in_background(cfg, start_timeout=3):
                pass
    assert any("is not placed yet" in r.getMessage() and "'CPU'" in r.getMessage() for r in caplog.records)
    _wait_for(lambda: held() == before, 10, "the timed-out start's placement group to be removed")
    names = {ReplicaSpec(None, None, False, 1, None).placement_group_name(0) for _ in range(2)}
    assert len(names) == 2 and all(n.startswith("folio-") and n.endswith("-replica-0") for n in names)
