"""The batch runner against a stand-in OpenAI endpoint on 127.0.0.1 (real HTTP, no
Ray): bad lines of every kind, retries of what another replica could answer, 4xx
written as responses, error lines retried on resume up to a limit, the API key, and
runs killed mid-job and mid-rewrite (a real runner process, SIGKILLed) that lose
nothing. The last test submits through a real Ray job API with token authentication.
tests/e2e/test_autoscaling.py runs a batch as a Ray job against folio itself."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from folio.cluster.entrypoints.batch import EndpointRefused, run_batch
from folio.cluster.entrypoints.batch_input import PLAIN_REQUEST_ID
from tests import REPO_ROOT
from tests.e2e.ray_head import RayHeadPorts, start_ray_head, stop_group

ROOT = str(REPO_ROOT)


@dataclass
class StandIn:
    """The stand-in endpoint and what it saw. A body's fields steer it: "fail": n answers
    503 to the first n tries of that request id (a replica going away), "bad" a 400,
    "html" a 200 that is not JSON, "delay" sleeps first."""

    url: str
    tries: dict = field(default_factory=dict)  # x-request-id -> requests seen
    request_ids: list = field(default_factory=list)  # every x-request-id, in arrival order
    api_key: Optional[str] = None  # when set, anything else gets a 401


@contextmanager
def _served(app: FastAPI) -> Iterator[str]:
    """app served by uvicorn on a thread, at a free 127.0.0.1 port; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def endpoint():
    app = FastAPI()
    state = StandIn("")

    async def serve(request: Request, kind: str):
        if state.api_key is not None and request.headers.get("authorization") != f"Bearer {state.api_key}":
            return JSONResponse({"error": {"message": "no key"}}, status_code=401)
        rid = request.headers["x-request-id"]
        state.request_ids.append(rid)
        state.tries[rid] = state.tries.get(rid, 0) + 1
        body = await request.json()
        await asyncio.sleep(body.get("delay", 0))
        if body.get("bad"):
            return JSONResponse({"error": {"message": "bad field"}}, status_code=400)
        if state.tries[rid] <= body.get("fail", 0):
            return JSONResponse({"error": {"message": "replica gone"}}, status_code=503)
        if body.get("html"):
            return PlainTextResponse("<html>proxy error</html>")
        if kind == "chat":
            text = body["messages"][-1]["content"].upper()
            return {"id": f"chatcmpl-{rid}", "choices": [{"index": 0, "message": {"content": text}}]}
        return {"id": f"cmpl-{rid}", "choices": [{"index": 0, "text": body["prompt"].upper()}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, "text")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await serve(request, "chat")

    with _served(app) as base_url:
        state.url = base_url + "/v1"
        yield state


def _write(path, rows) -> str:
    """rows: dicts (one JSON line each) or bytes (written as they are)."""
    path.write_bytes(b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in rows))
    return str(path)


def _line(cid: str, prompt: Optional[str] = None, **body) -> dict:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": prompt or f"text {cid}", **body},
    }


def _records(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _check_one_result_each(records: list[dict], good: list[dict]) -> None:
    """Every good line has exactly one record, a 200 carrying its own answer."""
    results = [r for r in records if r["response"] is not None]
    assert sorted(r["custom_id"] for r in results) == sorted(g["custom_id"] for g in good)
    prompts = {g["custom_id"]: g["body"]["prompt"] for g in good}
    for r in results:
        assert r["error"] is None and r["response"]["status_code"] == 200, r
        assert r["response"]["body"]["choices"][0]["text"] == prompts[r["custom_id"]].upper()


# The input lines that are not requests, each with the error code its line must get.
BAD_LINES = [
    (b"not json at all\n", "invalid_json_line"),
    (b'{"custom_id": "\xff\xfe", "url": "/v1/completions"}\n', "invalid_json_line"),  # not UTF-8
    (b"[" * 100_000 + b"\n", "invalid_json_line"),  # nested past the parser's depth
    (b'["an", "array"]\n', "invalid_json_line"),
    (b'{"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}\n', "missing_required_parameter"),
    (b'{"custom_id": "no-body", "url": "/v1/completions"}\n', "missing_required_parameter"),
    (b'{"custom_id": 7, "url": "/v1/completions", "body": {"prompt": "x"}}\n', "invalid_custom_id"),
    (b'{"custom_id": "", "url": "/v1/completions", "body": {"prompt": "x"}}\n', "invalid_custom_id"),
    (b'{"custom_id": "str-body", "url": "/v1/completions", "body": "x"}\n', "invalid_body"),
    (b'{"custom_id": "nan", "url": "/v1/completions", "body": {"prompt": "x", "temperature": NaN}}\n', "invalid_body"),
    (json.dumps(_line("streamed", stream=True)).encode() + b"\n", "invalid_body"),
    (json.dumps({**_line("embed"), "url": "/v1/embeddings"}).encode() + b"\n", "invalid_url"),
    (json.dumps({**_line("get"), "method": "GET"}).encode() + b"\n", "invalid_method"),
    (json.dumps(_line("plain-1")).encode() + b"\n", "duplicate_custom_id"),
]


def test_every_bad_line_gets_one_error_line_and_every_good_line_one_result(tmp_path, endpoint):
    good = [
        _line("plain-1"),
        _line("città ☃ 1"),
        _line("x" * 300),
        _line("new\r\nline: 1"),
        _line("\ud800 lone surrogate", "text surrogate"),
        _line("batch-0123"),
        {
            **_line("chat-1"),
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "text chat-1"}]},
        },
    ]
    rows = [good[0], *[bad for bad, _ in BAD_LINES], b"\n", *good[1:]]  # a blank line is skipped
    inp, out = _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    seen_before = len(endpoint.request_ids)

    counts = asyncio.run(run_batch(inp, str(out), endpoint.url, concurrency=3))

    assert counts == {"ok": len(good), "failed": 0, "invalid": len(BAD_LINES), "retries": 0, "exhausted": 0}
    records = _records(out)
    assert len(records) == len(good) + len(BAD_LINES)
    errors = sorted((r for r in records if r["error"] is not None), key=lambda r: r["error"]["line"])
    assert [(r["error"]["line"], r["error"]["code"]) for r in errors] == [
        (n, code) for n, (_, code) in enumerate(BAD_LINES, 2)
    ]
    assert all(
        r["response"] is None and r["error"]["message"].startswith(f"line {r['error']['line']}:") for r in errors
    )
    assert errors[-1]["custom_id"] == "plain-1" and errors[6]["custom_id"] == 7  # verbatim
    chat = next(r for r in records if r["custom_id"] == "chat-1")
    assert chat["response"]["body"]["choices"][0]["message"]["content"] == "TEXT CHAT-1"
    _check_one_result_each([r for r in records if r["custom_id"] != "chat-1"], good[:-1])
    # Every header was a short plain token; ids that are not went as distinct digests.
    sent = endpoint.request_ids[seen_before:]
    assert len(sent) == len(good) and all(PLAIN_REQUEST_ID.fullmatch(rid) for rid in sent)
    assert "plain-1" in sent and "batch-0123" in sent and len(set(sent)) == len(good)
    assert sum(rid.startswith("batch-") and rid != "batch-0123" for rid in sent) == 4

    again = asyncio.run(run_batch(inp, str(out), endpoint.url))  # input errors are redone, not added
    assert again == {**counts, "ok": 0}
    assert len(endpoint.request_ids) == seen_before + len(good)
    records_again = _records(out)
    assert [r for r in records_again if r["error"] is None] == [r for r in records if r["error"] is None]
    assert sorted(r["error"]["line"] for r in records_again if r["error"] is not None) == [
        r["error"]["line"] for r in errors
    ]


def test_retries_then_resume_skips_finished_lines(tmp_path, endpoint):
    rows = [_line(f"r{i}", fail=1) for i in range(10)] + [_line("r10", bad=True)]
    inp, out = _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    # A previous run finished r0 and r1 and was cut off while writing r2.
    done = [
        {
            "id": "batch_req_x",
            "custom_id": f"r{i}",
            "error": None,
            "response": {"status_code": 200, "request_id": "old", "body": {}},
        }
        for i in (0, 1)
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"id": "batch_req_y", "cust')

    counts = asyncio.run(run_batch(inp, str(out), endpoint.url, concurrency=4))

    # r2..r9 were retried once after a 503; r10's 400 is its response
    assert counts == {"ok": 9, "failed": 0, "invalid": 0, "retries": 8, "exhausted": 0}
    records = _records(out)
    assert records[:2] == done
    assert sorted(r["custom_id"] for r in records) == sorted(r["custom_id"] for r in rows)
    by_id = {r["custom_id"]: r for r in records}
    assert by_id["r5"]["response"]["body"]["choices"][0]["text"] == "TEXT R5"
    assert by_id["r5"]["response"]["request_id"] == "cmpl-r5" and by_id["r5"]["id"].startswith("batch_req_")
    assert by_id["r10"]["response"]["status_code"] == 400 and by_id["r10"]["error"] is None
    assert "r0" not in endpoint.tries and "r1" not in endpoint.tries  # finished lines never resent

    again = asyncio.run(run_batch(inp, str(out), endpoint.url))  # all done: nothing to send
    assert again == {"ok": 0, "failed": 0, "invalid": 0, "retries": 0, "exhausted": 0}
    assert len(out.read_text().splitlines()) == len(rows)


def test_error_lines_are_retried_on_resume_up_to_the_limit(tmp_path, endpoint):
    """One try per run: "heal" fails in two runs and then answers; "never" always fails and
    is left as an error line once it has failed in max_line_attempts (3) runs."""
    rows = [_line("heal", fail=2), _line("never", fail=100), _line("fine")]
    inp, out = _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"

    def run() -> dict:
        return asyncio.run(run_batch(inp, str(out), endpoint.url, max_attempts=1, max_line_attempts=3))

    def by_id() -> dict:
        records = _records(out)
        assert len(records) == len({r["custom_id"] for r in records}) == len(rows)  # one line each
        return {r["custom_id"]: r for r in records}

    assert run() == {"ok": 1, "failed": 2, "invalid": 0, "retries": 0, "exhausted": 0}
    assert {c: r["error"]["attempts"] for c, r in by_id().items() if r["error"]} == {"heal": 1, "never": 1}
    assert run() == {"ok": 0, "failed": 2, "invalid": 0, "retries": 0, "exhausted": 0}
    assert {c: r["error"]["attempts"] for c, r in by_id().items() if r["error"]} == {"heal": 2, "never": 2}
    assert run() == {"ok": 1, "failed": 1, "invalid": 0, "retries": 0, "exhausted": 0}
    final = by_id()
    assert final["heal"]["response"]["body"]["choices"][0]["text"] == "TEXT HEAL"
    assert final["never"]["error"] == {"code": "http_503", "attempts": 3, "message": final["never"]["error"]["message"]}
    assert run() == {"ok": 0, "failed": 0, "invalid": 0, "retries": 0, "exhausted": 1}
    assert by_id() == final
    assert (endpoint.tries["heal"], endpoint.tries["never"], endpoint.tries["fine"]) == (3, 3, 1)


def test_unreachable_endpoint_and_bodies_that_are_not_json_are_line_errors(tmp_path, endpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # closed again: nothing listens
    inp, out = _write(tmp_path / "in.jsonl", [_line("u0")]), tmp_path / "out.jsonl"
    counts = asyncio.run(run_batch(inp, str(out), dead, max_attempts=2))
    assert counts["failed"] == 1
    [record] = _records(out)
    assert record["response"] is None and record["error"]["code"] == "connection_error"
    assert record["error"]["attempts"] == 1

    inp, out = _write(tmp_path / "in2.jsonl", [_line("h0", html=True), _line("h1")]), tmp_path / "o2.jsonl"
    counts = asyncio.run(run_batch(inp, str(out), endpoint.url, max_attempts=2))
    assert counts == {"ok": 1, "failed": 1, "invalid": 0, "retries": 1, "exhausted": 0}
    by_id = {r["custom_id"]: r for r in _records(out)}
    assert by_id["h0"]["error"]["code"] == "invalid_response" and "proxy error" in by_id["h0"]["error"]["message"]
    assert by_id["h1"]["response"]["status_code"] == 200


def test_api_key_is_sent_and_a_refused_key_stops_the_job_without_writing_lines(tmp_path, endpoint):
    rows = [_line(f"k{i}") for i in range(6)]
    inp, out = _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    endpoint.api_key = "sk-folio-test"
    try:
        with pytest.raises(EndpointRefused, match="401"):
            asyncio.run(run_batch(inp, str(out), endpoint.url, concurrency=2))
        with pytest.raises(EndpointRefused):
            asyncio.run(run_batch(inp, str(out), endpoint.url, api_key="sk-wrong"))
        assert out.read_text() == ""  # a 401 is nobody's line: resume sends them all
        counts = asyncio.run(run_batch(inp, str(out), endpoint.url, api_key="sk-folio-test"))
    finally:
        endpoint.api_key = None
    assert counts["ok"] == len(rows)
    _check_one_result_each(_records(out), rows)


# ---------------------------------------------------------------- a real runner process, killed


def _runner(inp: str, out: str, url: str, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "folio.cluster.entrypoints.batch",
            "run",
            inp,
            "--output",
            out,
            "--endpoint",
            url,
            *args,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_runner_killed_mid_run_then_resumed_has_every_line_once(tmp_path, endpoint):
    rows = [_line(f"m{i}", delay=0.1) for i in range(24)]
    inp, out = _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    endpoint.api_key = "sk-env"
    try:
        proc = _runner(inp, str(out), endpoint.url, {"FOLIO_API_KEY": "sk-env"}, "--concurrency", "4")
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text().count("\n") >= 6):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the runner made no progress: {proc.communicate()[0]}")
            time.sleep(0.01)
        proc.kill()
        proc.communicate()
        finished = out.read_text().count("\n")
        assert finished < len(rows)
        counts = asyncio.run(run_batch(inp, str(out), endpoint.url, api_key="sk-env"))
    finally:
        endpoint.api_key = None
    assert counts["ok"] == len(rows) - finished
    _check_one_result_each(_records(out), rows)


def _kill_at_first_write_open(proc: subprocess.Popen, directory: str) -> str:
    """SIGKILL `proc` as soon as it holds a file in `directory` open for writing (the
    moment a rewrite starts, whatever its method); returns that file's path."""
    fds = f"/proc/{proc.pid}/fd"
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        for fd in os.listdir(fds):
            try:
                target = os.readlink(f"{fds}/{fd}")
                with open(f"/proc/{proc.pid}/fdinfo/{fd}") as f:
                    flags = int(f.read().split("flags:")[1].split()[0], 8)
            except (OSError, IndexError):
                continue
            if os.path.dirname(target) == directory and flags & (os.O_WRONLY | os.O_RDWR):
                proc.kill()
                proc.communicate()
                return target
    pytest.fail(f"the runner never opened a file in {directory} for writing: {proc.communicate()[0]}")


def test_crash_during_the_resume_rewrite_loses_no_finished_result(tmp_path, endpoint):
    """A resumed run must rewrite the output (it ends in a torn line); it is killed the moment
    it opens anything next to the output for writing. The old output must be whole."""
    finished, pending = 2000, 5
    rows = [_line(f"w{i}") for i in range(finished + pending)]
    inp = _write(tmp_path / "in.jsonl", rows)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.jsonl"
    big = "y" * 10_000  # the rewrite takes long enough to be caught in the middle
    with open(out, "w") as f:
        for row in rows[:finished]:
            f.write(
                json.dumps(
                    {
                        "id": "batch_req_old",
                        "custom_id": row["custom_id"],
                        "error": None,
                        "response": {
                            "status_code": 200,
                            "request_id": "old",
                            "body": {"choices": [{"text": row["body"]["prompt"].upper()}], "pad": big},
                        },
                    }
                )
                + "\n"
            )
        f.write('{"id": "batch_req_torn", "custom_id": "w20')
    before = out.read_bytes()
    key_file = tmp_path / "key"
    key_file.write_text("sk-file\n")
    endpoint.api_key = "sk-file"
    try:
        proc = _runner(inp, str(out), endpoint.url, {}, "--api-key-file", str(key_file))
        opened = _kill_at_first_write_open(proc, os.path.realpath(out_dir))
        assert out.read_bytes() == before, "a killed rewrite changed the output"
        assert opened != str(out) and os.path.exists(opened), "killed before the temporary file was written"

        counts = asyncio.run(run_batch(inp, str(out), endpoint.url, api_key="sk-file"))
    finally:
        endpoint.api_key = None
    assert counts["ok"] == pending
    assert os.listdir(out_dir) == ["out.jsonl"]  # the stale temporary is gone
    assert out.read_bytes().startswith(before[: before.rindex(b"\n") + 1])
    _check_one_result_each(_records(out), rows)


# ---------------------------------------------------------------- through Ray's job API


@pytest.mark.slow
@dataclass
class JobApi:
    """A stand-in for Ray's job API (its HTTP contract as JobSubmissionClient speaks it)
    whose job agent is not up for the first `not_ready` submissions, answering as Ray
    does then. lose_answer: the first such answer comes after the job was taken (the
    agent timed out mid-submission)."""

    url: str = ""
    not_ready: int = 0
    lose_answer: bool = False
    posts: int = 0
    jobs: dict = field(default_factory=dict)  # submission id -> entrypoint


@pytest.fixture
def job_api():
    import ray

    app, api = FastAPI(), JobApi()

    @app.get("/api/version")
    async def version():
        return {"version": "4", "ray_version": ray.__version__, "ray_commit": "stand-in"}

    @app.post("/api/jobs/")
    async def submit(request: Request):
        body = await request.json()
        api.posts += 1
        sid = body["submission_id"]
        if sid in api.jobs:
            return PlainTextResponse(f"Job with submission_id {sid} already exists.", status_code=400)
        if api.posts <= api.not_ready:
            if api.lose_answer and api.posts == 1:
                api.jobs[sid] = body["entrypoint"]
            return PlainTextResponse("No available agent to submit job, please try again later.", status_code=500)
        api.jobs[sid] = body["entrypoint"]
        return {"job_id": None, "submission_id": sid}

    @app.get("/api/jobs/{sid}")
    async def info(sid: str):
        return {"type": "SUBMISSION", "submission_id": sid, "status": "RUNNING", "entrypoint": api.jobs[sid]}

    with _served(app) as api.url:
        yield api


def _submit(job_api: JobApi, tmp_path, **kw) -> str:
    from folio.cluster.entrypoints import batch_job

    args = dict(address=job_api.url, endpoint="http://127.0.0.1:1/v1", concurrency=1, max_line_attempts=1)
    return batch_job.submit(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), **args, **kw)


def test_submit_waits_for_the_heads_job_agent_and_submits_once(tmp_path, job_api):
    """Right after `ray up` the dashboard answers before its job agent is up (500, "try
    again later"): submit asks again until it is, and a try that was taken although
    its answer said otherwise is not submitted a second time."""
    job_api.not_ready = 3
    job_id = _submit(job_api, tmp_path)
    assert job_api.posts == 4 and list(job_api.jobs) == [job_id]

    job_api.posts, job_api.jobs, job_api.lose_answer = 0, {}, True
    job_id = _submit(job_api, tmp_path)
    assert job_api.posts == 2 and list(job_api.jobs) == [job_id]

    # A job of that id from before (the operator's --job-id) is not taken for this one.
    job_api.posts, job_api.not_ready, job_api.lose_answer = 0, 0, False
    with pytest.raises(RuntimeError, match="already exists"):
        _submit(job_api, tmp_path, submission_id=job_id)

    job_api.posts, job_api.jobs, job_api.not_ready = 0, {}, 100
    with pytest.raises(RuntimeError, match="No available agent"):
        _submit(job_api, tmp_path, agent_wait_s=2)
    assert 2 <= job_api.posts <= 5 and not job_api.jobs


def test_submit_and_status_present_rays_token_from_home(tmp_path, endpoint):
    """A head started with Ray's token authentication; `folio batch submit/status` find the
    token in ~/.ray/auth_token with RAY_AUTH_MODE unset, and fail clearly without one. The
    endpoint's API key reaches the job as a file path, never through the job API."""
    workdir = tempfile.mkdtemp(prefix="folio-bt-")  # short: Ray's socket paths live under it
    token = secrets.token_hex(16)
    home, empty_home = tmp_path / "home", tmp_path / "empty"
    (home / ".ray").mkdir(parents=True)
    empty_home.mkdir()
    (home / ".ray" / "auth_token").write_text(token)
    ports = RayHeadPorts()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    # The head's Ray finds folio's Python through FOLIO_PYTHON, as the deploy configs set it;
    # the job's PATH leads to no Python with folio (the job must not depend on it).
    venv_bin = os.path.dirname(sys.executable)
    head_path = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep) if d and d != venv_bin)
    head = start_ray_head(
        ports,
        workdir,
        {
            **env,
            "PATH": head_path,
            "FOLIO_PYTHON": sys.executable,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(home / ".ray" / "auth_token"),
        },
    )
    address = f"http://127.0.0.1:{ports.dashboard}"
    endpoint.api_key = "sk-ray-job"
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None and time.monotonic() < deadline, open(f"{workdir}/head.log").read()
            try:
                api = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.25)
        key_file = tmp_path / "key"
        key_file.write_text("sk-ray-job")
        rows = [_line(f"j{i}") for i in range(4)]
        inp, out = _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"

        def folio_batch(*args: str, home_dir) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "folio.cluster.entrypoints.cli", "batch", *args, "--address", address],
                cwd=ROOT,
                env={**env, "HOME": str(home_dir)},
                capture_output=True,
                text=True,
                timeout=180,
            )  # the CLI imports torch

        submit_args = (
            "submit",
            inp,
            "--output",
            str(out),
            "--endpoint",
            endpoint.url,
            "--api-key-file",
            str(key_file),
        )
        refused = folio_batch(*submit_args, home_dir=empty_home)
        assert refused.returncode != 0 and "~/.ray/auth_token" in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr

        submitted = folio_batch(*submit_args, home_dir=home)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        job_id = submitted.stdout.strip().splitlines()[-1]
        while (state := api.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.monotonic() < deadline + 120, api.get_job_logs(job_id)[-3000:]
            time.sleep(0.25)
        assert state == JobStatus.SUCCEEDED, api.get_job_logs(job_id)[-3000:]
        assert f"batch runner: {sys.executable}" in api.get_job_logs(job_id)
        _check_one_result_each(_records(out), rows)
        assert "sk-ray-job" not in repr(api.list_jobs())  # what `ray job list` shows

        shown = folio_batch("status", job_id, home_dir=home)
        assert shown.returncode == 0, shown.stderr[-3000:]
        assert json.loads(shown.stdout)["progress"].startswith("progress: 4/4 done")
    finally:
        endpoint.api_key = None
        stop_group(head)
        shutil.rmtree(workdir, ignore_errors=True)
