"""Batch jobs: an OpenAI Batch API input file, run through the cluster's endpoint.

    folio batch submit requests.jsonl --output results.jsonl    # prints the job id
    folio batch status JOB_ID                                   # state and progress

`submit` (batch_job.py) hands Ray's job API an entrypoint, `"${FOLIO_PYTHON:-python}" -m
folio.cluster.entrypoints.batch run ...`, which Ray runs on the head node in folio's own
interpreter (the deploy configs set FOLIO_PYTHON on `ray start`). That process, this
module, checks the input (batch_input.py), resumes from the output
(batch_output.py), sends every line still to do to the cluster's OpenAI
endpoint with bounded concurrency and appends one output line per input line.
Paths are as the head node sees them.

Input lines: {"custom_id", "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions", "body": {...}}. Output lines: {"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error": null}, or
"response": null and "error": {"code", "message", ...} when a line could not be
served. Output order is completion order, as in OpenAI's batch output.

Every input line ends as exactly one output line; a line fails only itself:
- A line that is not a request (not JSON, a field missing or of the wrong type,
  `stream: true`, another url or method, a custom_id seen before) gets an error
  line naming it: {"code", "message", "line", "param"}. Only what makes every
  line fail stops the job before it writes anything: an input file it cannot
  read, an output it cannot write, an API key it cannot send, an endpoint that
  answers 401 (the key is wrong for every line alike).
- custom_id goes to the output verbatim; the x-request-id header carries it
  only when it is a short plain token, else a digest of it (header values are
  ASCII, and the server bounds their length).
- Connection errors, 408, 409, 429, 5xx and bodies that are not JSON are
  retried with backoff (a replica going away answers 503, another replica
  answers the retry). A 4xx other than those is the request's own fault and is
  its response, as with OpenAI. When the tries run out, or anything unexpected
  happens while sending, the line's error line records it with "attempts".
- The job stopped (head restart, `ray job stop`, a crash): submitting the same
  input and output again resumes. Lines with a response are kept and not sent
  again; error lines are sent again until a line has failed in
  `--max-line-attempts` runs; input-check error lines are redone from the
  input. The output is rewritten for that through a temporary file in its
  directory, fsync and an atomic rename, so a crash at any moment leaves the
  old file or the new one. Appends are flushed line by line: a crash loses at
  most a partly written last line, which resume drops.

Progress goes to the job's log ("progress: done/total ..." lines), which
`folio batch status` shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Optional

import httpx

from folio.cluster.entrypoints import batch_job
from folio.cluster.entrypoints.batch_input import BadLine, BatchLine, read_input
from folio.cluster.entrypoints.batch_output import new_record, plan_resume, remove_stale_temporaries, rewrite_atomically

RETRYABLE_4XX = {408, 409, 429}  # and every 5xx: another try (or replica) may answer
DEFAULT_MAX_LINE_ATTEMPTS = 3
API_KEY_ENV = "FOLIO_API_KEY"


class EndpointRefused(RuntimeError):
    """The endpoint answered 401: the API key is missing or wrong, for every line alike."""


async def run_batch(
    input_path: str,
    output_path: str,
    endpoint: str,
    *,
    concurrency: int = 16,
    max_attempts: int = 20,
    max_line_attempts: int = DEFAULT_MAX_LINE_ATTEMPTS,
    api_key: Optional[str] = None,
    timeout_s: float = 600.0,
) -> dict:
    """Send every line of the input that has no final output line; returns this run's counts:
    ok (responses), failed (error lines), invalid (input-check error lines), exhausted (lines
    left at an earlier error line: max_line_attempts reached), retries (HTTP tries repeated).
    Raises OSError for an unreadable input or unwritable output, EndpointRefused on a 401."""
    headers = _auth_headers(api_key)
    good, bad = read_input(input_path)
    remove_stale_temporaries(output_path)
    resume = plan_resume(output_path, max_line_attempts)
    if resume.rewrite:
        rewrite_atomically(output_path, resume.keep)
    todo = [line for line in good if line.custom_id not in resume.done]
    counts = {
        "ok": 0,
        "failed": 0,
        "invalid": 0,
        "retries": 0,
        "exhausted": sum(1 for line in good if line.custom_id in resume.exhausted),
    }
    total, start_done = len(good) + len(bad), len(good) - len(todo)
    print(
        f"batch: {total} lines ({len(bad)} invalid), {start_done} already in {output_path}, "
        f"{len(todo)} to run against {endpoint}",
        flush=True,
    )
    base = endpoint.rstrip("/").removesuffix("/v1")
    queue: asyncio.Queue[BatchLine] = asyncio.Queue()
    for line in todo:
        queue.put_nowait(line)
    started, refused = time.monotonic(), []

    def progress() -> None:
        done = start_done + counts["ok"] + counts["failed"] + counts["invalid"]
        print(
            f"progress: {done}/{total} done, {counts['failed']} failed, {counts['invalid']} "
            f"invalid, {counts['retries']} retries, {time.monotonic() - started:.1f} s",
            flush=True,
        )

    with open(output_path, "a", encoding="utf-8") as out:

        def write(record: dict, outcome: str) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()
            counts[outcome] += 1
            if outcome != "invalid" and (counts["ok"] + counts["failed"]) % max(1, len(todo) // 20) == 0:
                progress()

        for b in bad:
            write(_bad_line_record(b), "invalid")

        async def worker(client: httpx.AsyncClient) -> None:
            while not queue.empty() and not refused:
                line = queue.get_nowait()
                try:
                    record = await answer(client, base, line, headers, max_attempts, counts)
                except EndpointRefused as e:
                    refused.append(e)  # the line stays unwritten: resume sends it
                    return
                except Exception as e:  # noqa: BLE001 - one line fails, not the job
                    record = _error_record(line, "batch_runner_error", f"{type(e).__name__}: {e}")
                if record["error"] is not None:
                    record["error"]["attempts"] = resume.attempts.get(line.custom_id, 0) + 1
                write(record, "ok" if record["error"] is None else "failed")

        async with httpx.AsyncClient(timeout=timeout_s) as client:
            await asyncio.gather(*(worker(client) for _ in range(max(1, concurrency))))
    if refused:
        raise refused[0]
    progress()
    return counts


def _auth_headers(api_key: Optional[str]) -> dict:
    if api_key is None:
        return {}
    if not api_key or not api_key.isascii() or not api_key.isprintable() or " " in api_key:
        raise ValueError("the API key must be printable ASCII without spaces")
    return {"Authorization": f"Bearer {api_key}"}


async def answer(
    client: httpx.AsyncClient, base: str, line: BatchLine, headers: dict, max_attempts: int, counts: dict
) -> dict:
    """One line to its output record, retrying what another try or replica could answer."""
    error = ("not_sent", "no attempt was made")
    delay = 0.0
    for attempt in range(max(1, max_attempts)):
        if attempt:
            counts["retries"] += 1
            await asyncio.sleep(max(delay, min(10.0, 0.5 * 2 ** (attempt - 1))))
        delay = 0.0
        try:
            r = await client.post(
                base + line.url,
                content=line.body,
                headers={**headers, "content-type": "application/json", "x-request-id": line.request_id},
            )
        except httpx.HTTPError as e:
            error = ("connection_error", f"{type(e).__name__}: {e}")
            continue
        if r.status_code == 401:
            raise EndpointRefused(
                f"{base} answered 401 ({r.text[:200]}): give the endpoint's API "
                f"key with --api-key-file or {API_KEY_ENV}"
            )
        if r.status_code in RETRYABLE_4XX or r.status_code >= 500:
            error, delay = (f"http_{r.status_code}", r.text[:500]), _retry_after(r)
            continue
        try:
            body = r.json()
        except ValueError:
            error = ("invalid_response", f"HTTP {r.status_code} with a body that is not JSON: {r.text[:200]!r}")
            continue
        request_id = body.get("id", "") if isinstance(body, dict) else ""
        return new_record(
            line.custom_id, response={"status_code": r.status_code, "request_id": request_id, "body": body}
        )
    return _error_record(line, *error)


def _retry_after(r: httpx.Response) -> float:
    """The server's Retry-After in seconds (capped at a minute), or 0."""
    try:
        return min(60.0, max(0.0, float(r.headers.get("retry-after", 0))))
    except ValueError:
        return 0.0


def _error_record(line: BatchLine, code: str, message: str) -> dict:
    return new_record(line.custom_id, error={"code": code, "message": message})


def _bad_line_record(b: BadLine) -> dict:
    return new_record(
        b.custom_id, error={"code": b.code, "message": f"line {b.line}: {b.message}", "line": b.line, "param": b.param}
    )


# ---------------------------------------------------------------- command lines

HELP = "OpenAI Batch API files, run as Ray jobs on the cluster"


def add_cli_args(b: argparse.ArgumentParser) -> None:
    """Its subcommands (submit, status, ...) each set their own func."""
    bsub = b.add_subparsers(dest="batch", required=True)
    s = bsub.add_parser("submit", help="submit INPUT.jsonl as a Ray job; prints the job id")
    s.add_argument("input", help="input JSONL (as the head node sees it)")
    s.add_argument("--output", required=True, help="output JSONL (as the head node sees it)")
    s.add_argument(
        "--address",
        default="http://127.0.0.1:8265",
        help="Ray's job API (the dashboard); Ray's token is sent when found in " + batch_job.TOKEN_PLACES,
    )
    s.add_argument("--endpoint", default="http://127.0.0.1:8000/v1", help="folio's OpenAI endpoint")
    s.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    s.add_argument(
        "--max-line-attempts",
        type=int,
        default=DEFAULT_MAX_LINE_ATTEMPTS,
        help="runs (first and resumes) in which a line may end in an error",
    )
    s.add_argument(
        "--api-key-file",
        default=None,
        help="file on the head holding the endpoint's API key (default: the head's "
        f"{API_KEY_ENV}); the key itself never goes through Ray's job API",
    )
    s.add_argument(
        "--python",
        default=None,
        help="the head's Python with folio installed, as the job's shell finds it (default: "
        "$FOLIO_PYTHON in the head's Ray environment, which the deploy configs set, else python)",
    )
    s.add_argument("--job-id", default=None, help="submission id (default: raysubmit_folio_ and 16 hex digits)")
    s.set_defaults(
        func=lambda a: _cli(
            lambda: print(
                batch_job.submit(
                    a.input,
                    a.output,
                    address=a.address,
                    endpoint=a.endpoint,
                    concurrency=a.concurrency,
                    max_line_attempts=a.max_line_attempts,
                    api_key_file=a.api_key_file,
                    python=a.python,
                    submission_id=a.job_id,
                )
            )
        )
    )
    st = bsub.add_parser("status", help="a batch job's state and progress")
    st.add_argument("job_id")
    st.add_argument("--address", default="http://127.0.0.1:8265")
    st.set_defaults(
        func=lambda a: _cli(lambda: print(json.dumps(batch_job.status(a.job_id, address=a.address), indent=2)))
    )


def _cli(action) -> None:
    try:
        action()
    except batch_job.JobApiError as e:
        sys.exit(f"folio batch: {e}")


def _read_api_key(path: Optional[str]) -> Optional[str]:
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get(API_KEY_ENV) or None


def _main(argv: list[str]) -> None:
    """The job's entrypoint: `python -m folio.cluster.entrypoints.batch run INPUT --output OUTPUT --endpoint URL`.
    Exit status: 0 when every line has a response, 1 when some line ended in an error line,
    2 when the job could not run (unreadable input, unwritable output, a refused API key)."""
    p = argparse.ArgumentParser(prog="python -m folio.cluster.entrypoints.batch")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("input")
    r.add_argument("--output", required=True)
    r.add_argument("--endpoint", required=True)
    r.add_argument("--concurrency", type=int, default=16)
    r.add_argument("--max-line-attempts", type=int, default=DEFAULT_MAX_LINE_ATTEMPTS)
    r.add_argument("--api-key-file", default=None, help=f"file holding the API key (else ${API_KEY_ENV})")
    args = p.parse_args(argv)
    print(f"batch runner: {sys.executable}", flush=True)
    try:
        counts = asyncio.run(
            run_batch(
                args.input,
                args.output,
                args.endpoint,
                concurrency=args.concurrency,
                max_line_attempts=args.max_line_attempts,
                api_key=_read_api_key(args.api_key_file),
            )
        )
    except (OSError, ValueError, EndpointRefused) as e:
        print(f"batch stopped: {e}", flush=True)
        sys.exit(2)
    print(
        f"batch done: {counts['ok']} ok, {counts['failed']} failed, {counts['invalid']} invalid, "
        f"{counts['exhausted']} exhausted, {counts['retries']} retries",
        flush=True,
    )
    if counts["failed"] or counts["invalid"] or counts["exhausted"]:
        sys.exit(1)


if __name__ == "__main__":
    _main(sys.argv[1:])
