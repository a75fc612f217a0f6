"""Batch output lines and resuming from them.

A record is OpenAI's batch output line: {"id", "custom_id", "response":
{"status_code", "request_id", "body"} | null, "error": {"code", "message", ...}
| null}. An error line of a line that could not be served has "attempts" (runs
that ended in an error); one of an input line that is not a request has "line"
and "param". The output is only ever appended to, line by line, or replaced
whole through rewrite_atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Optional


def new_record(custom_id: object, *, response: Optional[dict] = None, error: Optional[dict] = None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


@dataclass
class Resume:
    """What an existing output holds for this run."""

    keep: list[bytes]  # its lines that stay, in order, each ending in a newline
    done: set[str]  # custom_ids that have a final line: not sent again
    attempts: dict[str, int]  # custom_id -> runs that ended in an error, for lines to retry
    exhausted: set[str]  # custom_ids whose error line is final (attempts used up)
    rewrite: bool  # keep differs from the file: it must be rewritten


def plan_resume(path: str, max_line_attempts: int) -> Resume:
    """Read an earlier run's output: responses stay; error lines stay once their line has
    failed max_line_attempts times, else they are dropped and the line is sent again;
    input-check error lines are dropped (this run redoes them); a torn line is dropped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Resume([], set(), {}, set(), False)
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    parsed = [(raw, _parse_record(raw)) for raw in lines]
    done = {
        r["custom_id"]
        for _, r in parsed
        if r is not None and r.get("response") is not None and isinstance(r.get("custom_id"), str)
    }
    keep, attempts, exhausted = [], {}, set()
    for raw, r in parsed:
        if r is None or _is_input_error(r):
            continue
        cid = r.get("custom_id")
        if r.get("response") is None and isinstance(cid, str):  # a line's error line
            if cid in done:
                continue
            tries = _attempts(r)
            if tries < max_line_attempts:
                attempts[cid] = max(tries, attempts.get(cid, 0))
                continue
            done.add(cid)
            exhausted.add(cid)
        keep.append(raw + b"\n")
    retry = {c: n for c, n in attempts.items() if c not in done}
    return Resume(keep, done, retry, exhausted, rewrite=b"".join(keep) != data)


def _parse_record(raw: bytes) -> Optional[dict]:
    """An output line as a record, or None (a torn line, or not a record at all)."""
    try:
        r = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return r if isinstance(r, dict) else None


def _is_input_error(r: dict) -> bool:
    return r.get("response") is None and isinstance(r.get("error"), dict) and "line" in r["error"]


def _attempts(r: dict) -> int:
    n = r["error"].get("attempts") if isinstance(r.get("error"), dict) else None
    return n if isinstance(n, int) and n > 0 else 1


def rewrite_atomically(path: str, lines: list[bytes]) -> None:
    """Replace the file at `path` with `lines`: a temporary file in the same directory,
    fsync, os.replace, fsync of the directory. A crash leaves the old file or the new."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(path, tmp)  # mkstemp's 0600 would lock readers out
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(path: str) -> None:
    """Temporary files that a run killed mid-rewrite left next to the output."""
    directory, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(directory):
        if entry.startswith(f".{name}.") and entry.endswith(".tmp"):
            os.unlink(os.path.join(directory, entry))
