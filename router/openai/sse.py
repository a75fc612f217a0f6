"""Server-sent events: chunks as `data:` lines, errors inside the stream, keep-alives."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from folio.router.engine_client import RequestStream
from folio.router.errors import ApiError

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
# Built once: json.dumps would build an encoder per chunk for these options. Chunks are
# trees built afresh, so no cycle to look for (about a tenth of the encoding's cost).
_encode = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode


@dataclass
class StreamingResult:
    """SSE chunks of a streaming response; close() aborts whatever still runs."""

    chunks: AsyncIterator[str]
    streams: list[RequestStream]

    def close(self) -> None:
        for s in self.streams:
            s.cancel()


def sse(chunk: dict) -> str:
    """One chunk (as chunks.py builds it), or an error body, as a `data:` event."""
    return f"data: {_encode(chunk)}\n\n"


def streaming(chunks: AsyncIterator[str], streams: list[RequestStream], keepalive_s: float) -> StreamingResult:
    return StreamingResult(_keepalive(_errors_in_stream(chunks), keepalive_s), streams)


async def _errors_in_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once streaming has begun, an error can only be reported inside the stream: every
    failure ends it with an error event and [DONE]."""
    try:
        async for c in chunks:
            yield c
    except ApiError as e:
        yield sse(e.body())
        yield DONE
    except Exception:  # noqa: BLE001 - reported to the client without internals, logged here
        log.exception("a stream failed")
        yield sse(ApiError(500, "internal error while streaming").body())
        yield DONE


async def _keepalive(chunks: AsyncIterator[str], interval: float) -> AsyncIterator[str]:
    """Pass chunks through; while none comes for `interval` seconds (queued, or a long
    prefill), send an SSE comment so proxies and clients with idle timeouts keep the stream."""
    it = chunks.__aiter__()
    pending: Optional[asyncio.Task] = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield ": keep-alive\n\n"
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield chunk
    finally:
        if pending is not None:  # the client left mid-wait: stop the source first
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await it.aclose()
