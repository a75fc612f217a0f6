"""The batch runner against a stand-in OpenAI endpoint on 127.0.0.1 (real HTTP, no
Ray): input checks, retries of what another replica could answer, 4xx written as
responses, resume from an output with a torn last line. tests/test_autoscaling.py
runs it as a Ray job against folio itself."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cluster.batch import read_input, run_batch


@pytest.fixture(scope="module")
def endpoint():
    """Fails each custom_id's first try with 503 (a replica going away); 400 for "bad"."""
    app = FastAPI()
    tries: dict[str, int] = {}

    @app.post("/v1/completions")
    async def completions(request: Request):
        cid = request.headers["x-request-id"]
        body = await request.json()
        tries[cid] = tries.get(cid, 0) + 1
        if body.get("bad"):
            return JSONResponse({"error": {"message": "bad field"}}, status_code=400)
        if tries[cid] == 1:
            return JSONResponse({"error": {"message": "replica gone"}}, status_code=503)
        return {"id": f"cmpl-{cid}", "choices": [{"index": 0, "text": body["prompt"].upper()}]}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", tries
    server.should_exit = True
    thread.join(10)


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _line(i: int, **body) -> dict:
    return {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
            "body": {"prompt": f"text {i}", **body}}


def test_input_is_checked_before_anything_is_sent(tmp_path):
    with pytest.raises(ValueError, match=":2: custom_id 'c0' appears twice"):
        read_input(_write(tmp_path / "dup.jsonl", [_line(0), _line(0)]))
    with pytest.raises(ValueError, match=":1: only POST"):
        read_input(_write(tmp_path / "url.jsonl", [{**_line(0), "url": "/v1/embeddings"}]))
    with pytest.raises(ValueError, match=":1: not a batch request line"):
        read_input(_write(tmp_path / "junk.jsonl", [{"prompt": "x"}]))


def test_retries_then_resume_skips_finished_lines(tmp_path, endpoint):
    url, tries = endpoint
    rows = [_line(i) for i in range(10)] + [_line(10, bad=True)]
    inp, out = _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    # A previous run finished c0 and c1 and was cut off while writing c2.
    done = [{"id": "batch_req_x", "custom_id": f"c{i}", "error": None,
             "response": {"status_code": 200, "request_id": "old", "body": {}}} for i in (0, 1)]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"id": "batch_req_y", "cust')

    counts = asyncio.run(run_batch(inp, str(out), url, concurrency=4))

    assert counts == {"ok": 9, "failed": 0, "retries": 8}     # c2..c9 retried once; c10 is a 400
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[:2] == done
    assert sorted(r["custom_id"] for r in records) == sorted(r["custom_id"] for r in rows)
    by_id = {r["custom_id"]: r for r in records}
    assert by_id["c5"]["response"]["body"]["choices"][0]["text"] == "TEXT 5"
    assert by_id["c5"]["response"]["request_id"] == "cmpl-c5" and by_id["c5"]["id"].startswith("batch_req_")
    assert by_id["c10"]["response"]["status_code"] == 400 and by_id["c10"]["error"] is None
    assert "c0" not in tries and "c1" not in tries                 # finished lines never resent

    again = asyncio.run(run_batch(inp, str(out), url))            # everything done: nothing to send
    assert again == {"ok": 0, "failed": 0, "retries": 0}
    assert len(out.read_text().splitlines()) == len(rows)


def test_unreachable_endpoint_is_an_error_record(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"     # closed again: nothing listens
    inp, out = _write(tmp_path / "in.jsonl", [_line(0)]), tmp_path / "out.jsonl"
    counts = asyncio.run(run_batch(inp, str(out), dead, max_attempts=2))
    assert counts["failed"] == 1
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["response"] is None and record["error"]["code"] == "connection_error"
