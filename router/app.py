"""The HTTP API: FastAPI routes of the OpenAI-compatible server.

Every error leaves as an OpenAI error object ({"error": {message, type,
param, code}}): 400 for invalid input (including malformed JSON and wrong
types, which FastAPI would report as 422), 404 for an unknown model, 429 with
Retry-After when the admission queue is full, 503 when no replica can serve.
An x-request-id header names the request and is echoed on the response.

A client that disconnects, streaming or not, aborts its request: its blocks
are freed at the replica's next step.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from cluster.frontend import Frontend
from router.openai_serving import ApiError, OpenAIServing, StreamingResult, new_request_id
from router.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                             TokenizeRequest)

REQUEST_ID_HEADER = "x-request-id"


def build_app(serving: OpenAIServing, frontend: Frontend) -> FastAPI:
    app = FastAPI(title="folio", docs_url=None, redoc_url=None)
    app.add_middleware(_EchoRequestId)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(e).body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        err = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _respond(request, serving.completions(body, _request_id(request)))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await _respond(request, serving.chat(body, _request_id(request)))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": serving.model_name, "object": "model", "created": created, "owned_by": "folio",
            "max_model_len": frontend.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        return serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        return serving.detokenize(body)

    @app.get("/health")
    async def health() -> Response:
        dead = [f"replica {r.index}: {r.error}" for r in frontend.replicas if not r.alive]
        if dead:
            raise ApiError(503, "; ".join(dead), type="service_unavailable")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(frontend.metrics_text(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _request_id(request: Request) -> str:
    """The client's x-request-id made unique (ids may repeat across clients), or a fresh one."""
    given = request.headers.get(REQUEST_ID_HEADER)
    return f"{given}-{new_request_id()[:8]}" if given else new_request_id()


async def _respond(request: Request, work: Awaitable[Union[dict, StreamingResult]]) -> Response:
    """Run the serving call unless the client leaves first; then the call is cancelled,
    which aborts its engine requests."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=499)          # nobody reads it
    result = task.result()
    if isinstance(result, StreamingResult):
        # Starlette cancels the body on disconnect; the background task runs either way.
        return StreamingResponse(result.chunks, media_type="text/event-stream",
                                 background=BackgroundTask(result.close))
    return JSONResponse(result)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _validation_error(e: RequestValidationError) -> ApiError:
    errors: list[Any] = list(e.errors())
    if any(err.get("type") == "json_invalid" for err in errors):
        return ApiError(400, "the request body is not valid JSON")
    parts, param = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return ApiError(400, "; ".join(parts), param=param)


class _EchoRequestId:
    """ASGI middleware: copy the request's x-request-id onto the response.

    Pure ASGI, not BaseHTTPMiddleware, so streaming and disconnects pass through untouched.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        value = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER.encode()), None)
        if value is None:
            return await self.app(scope, receive, send)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [(REQUEST_ID_HEADER.encode(), value)]
            await send(message)
        await self.app(scope, receive, send_with_id)
