"""Autoscaling and batch jobs on a real Ray cluster with Ray's fake multi-node provider,
and `folio serve` exiting when that cluster goes away.

One machine plays a cluster: `ray start --head` with an autoscaling config whose
worker nodes are extra raylets started on demand. Only worker nodes have the
`fake_gpu` resource every folio worker asks for, so the head starts with no
replica-capable node and every replica makes Ray's autoscaler add a node.
`folio serve` (min 1, max 2 replicas) and `folio batch submit` run as the
operator would run them, in their own processes; the batch goes through Ray's
job submission API and folio's HTTP endpoint. The last test stops the cluster
under the server (one cluster and one server start serve all three tests).

Ray itself binds the machine's routable address (it replaces 127.0.0.1 for its
own processes); folio's workers and HTTP server bind 127.0.0.1, and the test
talks only to 127.0.0.1 (dashboard, folio). Everything started here shares one
process group (Ray's nodes, folio's workers) or its own, and is killed at the end.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx
import pytest
import yaml

from tests import REPO_ROOT
from tests.e2e.ray_head import RayHeadPorts, free_port, start_ray_head, stop_group, wait_for_head
from tests.e2e.reference import reference_llm
from tests.prometheus import samples

pytestmark = pytest.mark.slow

ROOT = str(REPO_ROOT)
NUM_LINES = 64
MAX_TOKENS = 16
RESUMED = 16  # lines the resumed job finds already done
# `folio batch` starts in well under a second; this bounds a loaded 2-core machine.
CLI_TIMEOUT = 180


def _env(**extra) -> dict:
    env = dict(
        os.environ,
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        PYTHONPATH=ROOT,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.update(extra)
    return env


def _cluster_config(gcs_port: int) -> dict:
    from ray._private.services import get_node_ip_address

    return {
        "cluster_name": "folio-fake",
        "max_workers": 2,
        "idle_timeout_minutes": 0.1,
        "upscaling_speed": 1.0,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Where the fake nodes' raylets find the head: Ray's own address for it.
            "gcs_address": f"{get_node_ip_address()}:{gcs_port}",
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {
                "resources": {"CPU": 1, "fake_gpu": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "auth": {"ssh_user": "unused"},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:port, the job API
    endpoint: str  # folio's http://127.0.0.1:port/v1
    workdir: str
    head: subprocess.Popen  # `ray start --head --block`, leader of the cluster's process group
    serve: Optional[subprocess.Popen] = None  # `folio serve`, in its own process group
    timeline: list = field(default_factory=list)  # (seconds, alive nodes, folio replicas)
    _sampler: Optional[threading.Thread] = None
    _stop_sampling: threading.Event = field(default_factory=threading.Event)
    t0: float = field(default_factory=time.monotonic)
    t0_wall: float = field(default_factory=time.time)

    def nodes(self) -> int:
        from ray.util.state import list_nodes

        # Ray keeps dead nodes listed (and truncates past them); count the live ones here.
        nodes = list_nodes(address=self.dashboard, limit=1000, raise_on_missing_output=False)
        return sum(n["state"] == "ALIVE" for n in nodes)

    def metrics(self) -> str:
        return httpx.get(self.endpoint.removesuffix("/v1") + "/metrics", timeout=10).text

    def replicas(self) -> int:
        return sum(value == 1 for (name, _), value in samples(self.metrics()).items() if name == "folio_replica_up")

    def finished_requests(self) -> int:
        return sum(
            int(float(line.split()[-1]))
            for line in self.metrics().splitlines()
            if line.startswith("folio_request_success_total{") and 'finished_reason="abort"' not in line
        )

    def wait_for(self, what, timeout: float, message: str) -> float:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, f"{message} (timeline: {self.timeline[-5:]})"
            time.sleep(0.5)
        return time.monotonic() - self.t0

    def start_sampling(self) -> None:
        self._sampler = threading.Thread(target=self._sample_forever, daemon=True)
        self._sampler.start()

    def stop_sampling(self) -> None:
        self._stop_sampling.set()
        if self._sampler is not None:
            self._sampler.join(30)

    def _sample_forever(self) -> None:
        while not self._stop_sampling.wait(0.5):
            try:
                self.timeline.append((round(time.monotonic() - self.t0, 1), self.nodes(), self.replicas()))
            except Exception:  # noqa: BLE001 - a missed sample is fine
                pass

    def at(self, t: float) -> tuple:
        return next((s for s in self.timeline if s[0] >= t), self.timeline[-1])


@pytest.fixture(scope="module")
def cluster():
    workdir = tempfile.mkdtemp(prefix="folio-as-")  # short: Ray's socket paths live under it
    config_path = os.path.join(workdir, "cluster.yaml")
    ports, port = RayHeadPorts(), free_port()
    with open(config_path, "w") as f:
        yaml.safe_dump(_cluster_config(ports.gcs), f)
    head = start_ray_head(
        ports,
        workdir,
        _env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1"),
        f"--autoscaling-config={config_path}",
    )
    serve = c = None
    try:
        address = wait_for_head(head, workdir)
        c = Cluster(f"http://127.0.0.1:{ports.dashboard}", f"http://127.0.0.1:{port}/v1", workdir, head)
        c.wait_for(lambda: _up(c.dashboard + "/api/version"), 60, "the dashboard did not come up")
        serve = c.serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "folio.cluster.entrypoints.cli",
                "serve",
                "--ray-address",
                address,
                "--port",
                str(port),
                "--device",
                "cpu",
                "--worker-host",
                "127.0.0.1",
                "--worker-resources",
                '{"fake_gpu": 1}',
                "--cpus-per-worker",
                "1",
                "--replicas",
                "1",
                "--min-replicas",
                "1",
                "--max-replicas",
                "2",
                "--upscale-delay",
                "2",
                "--downscale-delay",
                "5",
                "--max-num-seqs",
                "4",
                "--max-model-len",
                "512",
                "--num-kv-blocks",
                "128",
                # Exact fp32 (SmolLM2 dequantized at load): with the default kernels a step of
                # 160 rows or more multiplies through fp32 GEMMs and a narrower one through
                # torch's int4 kernel, which differ in the last bf16 bit of a few outputs, and
                # the reference batches these requests unlike the servers.
                "--kernels",
                "reference",
            ],
            cwd=ROOT,
            env=_env(),
            stdout=open(os.path.join(workdir, "serve.log"), "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        c.start_sampling()
        c.wait_for(
            lambda: (
                serve.poll() is None and _up(c.endpoint.removesuffix("/v1") + "/health") or serve.poll() is not None
            ),
            240,
            "folio serve did not become healthy",
        )
        assert serve.poll() is None, open(os.path.join(workdir, "serve.log")).read()[-3000:]
        yield c
    finally:
        if c is not None:
            c.stop_sampling()
        if serve is not None:
            stop_group(serve)
        stop_group(head)
        shutil.rmtree(workdir, ignore_errors=True)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _requests() -> list[dict]:
    lines = []
    for i in range(NUM_LINES):
        if i % 4 == 3:
            url, body = (
                "/v1/chat/completions",
                {
                    "messages": [{"role": "user", "content": f"Name a city whose name has {i % 9 + 3} letters."}],
                    "max_completion_tokens": MAX_TOKENS,
                    "temperature": 0,
                },
            )
        else:
            url, body = (
                "/v1/completions",
                {"prompt": f"Item {i}: the number {i} times two is", "max_tokens": MAX_TOKENS, "temperature": 0},
            )
        lines.append(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": url,
                "body": {"model": "SmolLM2-135M-Instruct.Q4_1", **body},
            }
        )
    return lines


def _greedy_reference() -> dict[str, str]:
    """Greedy text per custom_id from the in-process engine on the same model."""
    from folio.protos.messages import SamplingParams

    llm = reference_llm(kernels="reference")
    rows = _requests()
    prompts = [
        llm.chat_token_ids(r["body"]["messages"]) if "messages" in r["body"] else r["body"]["prompt"] for r in rows
    ]
    results = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    return {r["custom_id"]: res.outputs[0].text for r, res in zip(rows, results)}


def _on_one_torch_thread(fn):
    """fn() with torch on one thread. Beside the cluster's busy processes, torch's threads
    wait on each other at every op whenever one is descheduled: on a loaded 2-core machine
    the reference took minutes on two threads and seconds on one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # in the thread that runs fn: OpenMP's setting is per thread
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def expected():
    """The reference, computed on a thread while the cluster starts (tests list this
    fixture before `cluster`); .result() waits for it."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool.submit(_on_one_torch_thread, _greedy_reference)


def _write_input(cluster: Cluster, name: str) -> str:
    path = os.path.join(cluster.workdir, name)
    with open(path, "w") as f:
        for row in _requests():
            f.write(json.dumps(row) + "\n")
    return path


def _submit(cluster: Cluster, input_path: str, output_path: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "folio.cluster.entrypoints.cli",
            "batch",
            "submit",
            input_path,
            "--output",
            output_path,
            "--address",
            cluster.dashboard,
            "--endpoint",
            cluster.endpoint,
            "--concurrency",
            "16",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def _status(cluster: Cluster, job_id: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "folio.cluster.entrypoints.cli",
            "batch",
            "status",
            job_id,
            "--address",
            cluster.dashboard,
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _wait_job(cluster: Cluster, job_id: str, timeout: float) -> dict:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(0.25)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    return _status(cluster, job_id)


def _check_output(path: str, expected: dict[str, str]) -> list[dict]:
    records = [json.loads(line) for line in open(path)]
    assert sorted(r["custom_id"] for r in records) == sorted(expected), "a line is missing or repeated"
    for r in records:
        assert r["error"] is None and r["response"]["status_code"] == 200, r
        body = r["response"]["body"]
        choice = body["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert text == expected[r["custom_id"]], (r["custom_id"], text, expected[r["custom_id"]])
    return records


def test_batch_backlog_scales_replicas_and_nodes_up_then_down(expected, cluster):
    assert cluster.replicas() == 1
    start_nodes = cluster.nodes()
    assert start_nodes == 2, "head + the one worker node the first replica asked for"
    output = os.path.join(cluster.workdir, "out1.jsonl")
    t_submit = time.monotonic() - cluster.t0
    job = _submit(cluster, _write_input(cluster, "in.jsonl"), output)
    cluster.wait_for(lambda: cluster.replicas() == 2, 180, "no second replica")
    status = _wait_job(cluster, job, 300)
    assert status["progress"].startswith(f"progress: {NUM_LINES}/{NUM_LINES} done")
    assert status["metadata"]["output"] == output
    cluster.wait_for(lambda: cluster.replicas() == 1, 120, "the extra replica was not removed")
    cluster.wait_for(lambda: cluster.nodes() == start_nodes, 120, "the idle node stayed")
    # The sampler thread may not have seen the last change yet: record the state now.
    cluster.timeline.append((round(time.monotonic() - cluster.t0, 1), cluster.nodes(), cluster.replicas()))
    _check_output(output, expected.result())

    # The figures come from the sampled timeline (0.5 s apart) and Ray's own job end time.
    timeline = [s for s in cluster.timeline if s[0] >= t_submit]
    assert max(n for _, n, _ in timeline) == start_nodes + 1
    t_node = next(t for t, n, _ in timeline if n == start_nodes + 1)
    t_two = next(t for t, _, r in timeline if r == 2)
    t_one = next(t for t, _, r in timeline if t > t_two and r == 1)
    t_gone = next(t for t, n, _ in timeline if t > t_one and n == start_nodes)
    t_done = status["end_time"] / 1000 - cluster.t0_wall
    print("\ntimeline (s since the fixture started, alive Ray nodes incl. head, folio replicas):")
    last = None
    for t, n, r in cluster.timeline:
        if (n, r) != last:
            print(f"  {t:7.1f}  nodes={n}  replicas={r}")
            last = (n, r)
    print(
        f"job submitted {t_submit:.1f} s; node up +{t_node - t_submit:.1f} s; second replica serving "
        f"+{t_two - t_submit:.1f} s; job done +{t_done - t_submit:.1f} s; extra replica removed "
        f"{t_one - t_done:+.1f} s after the job; its node released {t_gone - t_one:.1f} s after that"
    )


def test_replica_killed_mid_batch_and_resumed_job_lose_no_line(expected, cluster):
    """Resume: the output already holds RESUMED lines, which are kept and not sent again.
    A replica's worker process is killed mid-job; its requests are retried elsewhere."""
    first = [line for line in open(os.path.join(cluster.workdir, "out1.jsonl"))][:RESUMED]
    output = os.path.join(cluster.workdir, "out2.jsonl")
    with open(output, "w") as f:
        f.writelines(first)
        f.write('{"id": "batch_req_torn", "custom_id": "li')  # a torn last line
    before = cluster.finished_requests()
    job = _submit(cluster, _write_input(cluster, "in2.jsonl"), output)
    cluster.wait_for(lambda: sum(1 for _ in open(output)) >= RESUMED + 8, 120, "the job made no progress")
    victims = _worker_pids(cluster)
    assert victims, "no folio worker process found"
    os.kill(victims[0], signal.SIGKILL)
    _wait_job(cluster, job, 300)
    records = _check_output(output, expected.result())
    assert [json.dumps(r) + "\n" for r in records[:RESUMED]] == first
    # Every line not already done finished exactly once on the server (failed attempts
    # on the killed replica do not count as finished); the resumed lines never went out.
    assert cluster.finished_requests() - before == NUM_LINES - RESUMED
    cluster.wait_for(
        lambda: cluster.replicas() >= 1 and _up(cluster.endpoint.removesuffix("/v1") + "/health"),
        120,
        "the dead replica was not replaced",
    )
    # Only the killed worker was lost: idle replicas survive the head's keepalive pings.
    # (The replica logs each lost worker once; its requests' failures repeat the text.)
    with open(os.path.join(cluster.workdir, "serve.log")) as f:
        assert len(re.findall(r"folio.cluster.replica: replica \d+ lost worker ", f.read())) == 1


def _worker_pids(cluster: Cluster) -> list[int]:
    """folio WorkerActor processes of this test's cluster (its temp dir is in their command line)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::WorkerActor") and _same_session(int(pid), cluster):
            pids.append(int(pid))
    return pids


def _same_session(pid: int, cluster: Cluster) -> bool:
    try:
        return any(cluster.workdir in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def test_serve_exits_when_its_cluster_stops(cluster):
    """Stopping the head's process group (GCS, raylets, the worker nodes and folio's workers)
    is what `ray stop` does to a cluster. The server must log why, exit non-zero and leave
    the port to the server a new cluster starts, instead of answering 503 forever (issue:
    `ray up --restart-only`). Last in this module: it ends the cluster the others ran on."""
    port = int(cluster.endpoint.removesuffix("/v1").rsplit(":", 1)[1])
    log_path = os.path.join(cluster.workdir, "serve.log")
    assert cluster.serve.poll() is None, open(log_path).read()[-3000:]
    cluster.stop_sampling()  # no request of ours is open on the port as the server exits
    stop_group(cluster.head)
    stopped = time.monotonic()
    try:
        code = cluster.serve.wait(90)
    except subprocess.TimeoutExpired:
        pytest.fail("folio serve kept running without its cluster:\n" + open(log_path).read()[-3000:])
    took = time.monotonic() - stopped
    log = open(log_path).read()
    assert code != 0, log[-3000:]
    assert "lost its Ray cluster" in log, log[-3000:]
    # The port is free for the next server: it binds and listens there as uvicorn does, with
    # SO_REUSEADDR, which the batch jobs' connections that linger in TIME_WAIT do not stop.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    print(f"folio serve exited {code} {took:.1f} s after its cluster stopped")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
