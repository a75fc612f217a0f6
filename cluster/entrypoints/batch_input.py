"""Batch input lines, checked one by one: a request to send, or what is wrong with it.

A line fails only itself: whatever it holds (not UTF-8, not JSON, nested past
the parser's depth, a field missing or of the wrong type, `stream: true`,
another url or method, a custom_id seen before, NaN in the body), checking it
returns a BadLine, never raises. Only an unreadable file fails the whole input.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Optional, Union

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions")
# custom_ids sent as they are in x-request-id; anything else is sent as a digest.
PLAIN_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(frozen=True)
class BatchLine:
    """One valid input line, ready to send."""

    custom_id: str
    url: str
    body: bytes  # the request body as strict JSON, serialized once
    request_id: str  # the x-request-id header value


@dataclass(frozen=True)
class BadLine:
    """An input line that is not a request; it becomes an error line, not a crash."""

    line: int  # 1-based line number in the input
    custom_id: object  # as given; None when the line has none
    code: str
    message: str
    param: Optional[str] = None


def request_id_header(custom_id: str) -> str:
    """custom_id itself when it is a short plain token, else 'batch-' and a digest of it."""
    if PLAIN_REQUEST_ID.fullmatch(custom_id):
        return custom_id
    digest = hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=16)
    return f"batch-{digest.hexdigest()}"


def read_input(path: str) -> tuple[list[BatchLine], list[BadLine]]:
    """Every non-blank line of the input, checked: the valid requests and the bad lines.
    OSError (the file cannot be read) is the only failure of the whole input."""
    good: list[BatchLine] = []
    bad: list[BadLine] = []
    seen: set[str] = set()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                checked = check_line(n, raw, seen)
                (good if isinstance(checked, BatchLine) else bad).append(checked)
    return good, bad


def check_line(n: int, raw: bytes, seen: set[str]) -> Union[BatchLine, BadLine]:
    """One input line as a request, or what is wrong with it. Adds its custom_id to `seen`."""
    try:
        row = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        return BadLine(n, None, "invalid_json_line", f"not a JSON line ({type(e).__name__})")
    if not isinstance(row, dict):
        return BadLine(n, None, "invalid_json_line", "not a JSON object")
    cid = row.get("custom_id")
    for field in ("custom_id", "url", "body"):
        if field not in row:
            return BadLine(n, cid, "missing_required_parameter", f"{field} is missing", field)
    if not isinstance(cid, str) or not cid:
        return BadLine(n, cid, "invalid_custom_id", "custom_id must be a non-empty string", "custom_id")
    if cid in seen:
        return BadLine(n, cid, "duplicate_custom_id", "custom_id appears on an earlier line", "custom_id")
    seen.add(cid)
    url, method, body = row["url"], row.get("method", "POST"), row["body"]
    if method != "POST":
        return BadLine(n, cid, "invalid_method", "only POST is supported", "method")
    if url not in SUPPORTED_URLS:
        return BadLine(n, cid, "invalid_url", f"url must be {' or '.join(SUPPORTED_URLS)}", "url")
    if not isinstance(body, dict):
        return BadLine(n, cid, "invalid_body", "body must be a JSON object", "body")
    if body.get("stream"):
        return BadLine(n, cid, "invalid_body", "stream is not supported in a batch", "body.stream")
    try:
        data = json.dumps(body, allow_nan=False).encode()  # ASCII: lone surrogates escaped
    except ValueError:
        return BadLine(n, cid, "invalid_body", "body holds NaN or Infinity", "body")
    return BatchLine(cid, url, data, request_id_header(cid))
