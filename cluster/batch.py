"""Batch jobs: an OpenAI Batch API input file, run through the cluster as a Ray job.

    folio batch submit requests.jsonl --output results.jsonl    # prints the job id
    folio batch status JOB_ID                                   # state and progress

`submit` hands Ray's job submission API (the dashboard, port 8265) an
entrypoint, `python -m cluster.batch run ...`, which Ray runs on the head node.
That process sends every input line to the cluster's OpenAI endpoint with
bounded concurrency and appends one output line per input line. Paths are as
the head node sees them.

Input lines: {"custom_id", "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions", "body": {...}}. Output lines: {"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error": null}, or
"response": null and "error": {"code", "message"} when a line could not be
served. Output order is completion order, as in OpenAI's batch output.

Robustness, in the order things go wrong:
- A replica going away (scale-down drains, so this is a worker dying) makes
  its requests fail with 503; connection errors, 429 and 5xx are retried with
  backoff, so such a line is answered by another replica.
- A 4xx other than 429 is the request's own fault and is written as its
  response, like OpenAI does.
- The job itself stopped (head restart, `ray job stop`): submitting the same
  input and output again resumes. The output is read first and every
  custom_id already in it is skipped; lines are flushed as they finish, so at
  most a partly written last line is lost, and it is dropped on resume.

Progress goes to the job's log ("progress: done/total ..." lines), which
`folio batch status` shows.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import httpx

RETRYABLE = {429, 500, 502, 503, 504}
SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True)
class BatchLine:
    custom_id: str
    url: str
    body: dict


def read_input(path: str) -> list[BatchLine]:
    """Parse and check the whole input before anything is sent; ValueError names the bad line."""
    lines, seen = [], set()
    with open(path) as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                cid, url, body = row["custom_id"], row["url"], row["body"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a batch request line ({e})") from None
            if row.get("method", "POST") != "POST" or url not in SUPPORTED_URLS:
                raise ValueError(f"{path}:{n}: only POST to {' or '.join(SUPPORTED_URLS)} is supported")
            if cid in seen:
                raise ValueError(f"{path}:{n}: custom_id {cid!r} appears twice")
            seen.add(cid)
            lines.append(BatchLine(str(cid), url, body))
    return lines


def finished_ids(path: str) -> set[str]:
    """custom_ids that already have an output line; rewrites the file without a torn last line."""
    if not os.path.exists(path):
        return set()
    done, good = set(), []
    with open(path) as f:
        for text in f:
            try:
                done.add(json.loads(text)["custom_id"])
                good.append(text if text.endswith("\n") else text + "\n")
            except (ValueError, KeyError, TypeError):
                pass            # the line being written when the last run stopped
    with open(path, "w") as f:
        f.writelines(good)
    return done


async def run_batch(input_path: str, output_path: str, endpoint: str, *, concurrency: int = 16,
                    max_attempts: int = 20, timeout_s: float = 600.0) -> dict:
    """Send every unfinished line of the input to the endpoint; returns counts by outcome."""
    lines = read_input(input_path)
    done = finished_ids(output_path)
    todo = [line for line in lines if line.custom_id not in done]
    print(f"batch: {len(lines)} lines, {len(lines) - len(todo)} already in {output_path}, "
          f"{len(todo)} to run against {endpoint}", flush=True)
    base = endpoint.rstrip("/").removesuffix("/v1")
    counts = {"ok": 0, "failed": 0, "retries": 0}
    queue: asyncio.Queue[BatchLine] = asyncio.Queue()
    for line in todo:
        queue.put_nowait(line)
    started = time.monotonic()

    with open(output_path, "a") as out:
        def write(record: dict) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()
            n = counts["ok"] + counts["failed"]
            if n % max(1, len(todo) // 20) == 0 or n == len(todo):
                print(f"progress: {len(lines) - len(todo) + n}/{len(lines)} done, "
                      f"{counts['failed']} failed, {counts['retries']} retries, "
                      f"{time.monotonic() - started:.1f} s", flush=True)

        async def worker(client: httpx.AsyncClient) -> None:
            while not queue.empty():
                line = queue.get_nowait()
                record = await _send(client, base, line, max_attempts, counts)
                counts["ok" if record["error"] is None else "failed"] += 1
                write(record)

        async with httpx.AsyncClient(timeout=timeout_s) as client:
            await asyncio.gather(*(worker(client) for _ in range(max(1, concurrency))))
    return counts


async def _send(client: httpx.AsyncClient, base: str, line: BatchLine, max_attempts: int,
                counts: dict) -> dict:
    """One line to its output record, retrying what another replica could still answer."""
    record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
              "response": None, "error": None}
    error = {"code": "unknown", "message": "not sent"}
    for attempt in range(max_attempts):
        if attempt:
            counts["retries"] += 1
            await asyncio.sleep(min(10.0, 0.5 * 2 ** (attempt - 1)))
        try:
            r = await client.post(base + line.url, json=line.body,
                                  headers={"x-request-id": line.custom_id})
        except httpx.HTTPError as e:
            error = {"code": "connection_error", "message": f"{type(e).__name__}: {e}"}
            continue
        if r.status_code in RETRYABLE:
            error = {"code": f"http_{r.status_code}", "message": r.text[:500]}
            continue
        body = r.json()
        record["response"] = {"status_code": r.status_code,
                              "request_id": body.get("id", "") if isinstance(body, dict) else "",
                              "body": body}
        return record
    record["error"] = error
    return record


# ---------------------------------------------------------------- Ray job submission

def submit(input_path: str, output_path: str, *, address: str, endpoint: str,
           concurrency: int = 16, submission_id: Optional[str] = None) -> str:
    """Submit the batch as a Ray job; returns its id. The input is checked here first."""
    from ray.job_submission import JobSubmissionClient
    input_path, output_path = os.path.abspath(input_path), os.path.abspath(output_path)
    num_lines = len(read_input(input_path))
    entrypoint = " ".join(shlex.quote(a) for a in [
        "python", "-m", "cluster.batch", "run", input_path, "--output", output_path,
        "--endpoint", endpoint, "--concurrency", str(concurrency)])
    client = JobSubmissionClient(address)
    return client.submit_job(
        entrypoint=entrypoint, submission_id=submission_id,
        metadata={"folio": "batch", "input": input_path, "output": output_path,
                  "lines": str(num_lines), "endpoint": endpoint})


def status(job_id: str, *, address: str) -> dict:
    """The job's state, its metadata and its last progress line."""
    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(address)
    info = client.get_job_info(job_id)
    progress = [ln for ln in client.get_job_logs(job_id).splitlines() if ln.startswith("progress:")]
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message,
            "start_time": info.start_time, "end_time": info.end_time,      # ms since the epoch
            "metadata": info.metadata, "progress": progress[-1] if progress else None}


def build_batch_parser(subparsers: argparse._SubParsersAction) -> None:
    b = subparsers.add_parser("batch", help="OpenAI Batch API files, run as Ray jobs on the cluster")
    bsub = b.add_subparsers(dest="batch", required=True)
    s = bsub.add_parser("submit", help="submit INPUT.jsonl as a Ray job; prints the job id")
    s.add_argument("input")
    s.add_argument("--output", required=True, help="output JSONL (as the head node sees it)")
    s.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard (job API)")
    s.add_argument("--endpoint", default="http://127.0.0.1:8000/v1", help="folio's OpenAI endpoint")
    s.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    s.add_argument("--job-id", default=None, help="submission id (default: Ray picks one)")
    s.set_defaults(func=lambda a: print(submit(a.input, a.output, address=a.address,
                                               endpoint=a.endpoint, concurrency=a.concurrency,
                                               submission_id=a.job_id)))
    st = bsub.add_parser("status", help="a batch job's state and progress")
    st.add_argument("job_id")
    st.add_argument("--address", default="http://127.0.0.1:8265")
    st.set_defaults(func=lambda a: print(json.dumps(status(a.job_id, address=a.address), indent=2)))


def _main(argv: list[str]) -> None:
    """The job's entrypoint: `python -m cluster.batch run INPUT --output OUTPUT --endpoint URL`."""
    p = argparse.ArgumentParser(prog="python -m cluster.batch")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("input")
    r.add_argument("--output", required=True)
    r.add_argument("--endpoint", required=True)
    r.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    counts = asyncio.run(run_batch(args.input, args.output, args.endpoint, concurrency=args.concurrency))
    print(f"batch done: {counts['ok']} ok, {counts['failed']} failed, {counts['retries']} retries",
          flush=True)
    if counts["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    _main(sys.argv[1:])
