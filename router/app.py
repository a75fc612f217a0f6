"""The HTTP API: FastAPI routes of the OpenAI-compatible server.

Before a route runs, the edge middleware (router/edge.py) has checked the API
key, the body's size and type, and the x-request-id header. A route then
parses its body with the request model (router/protocol.py): malformed JSON,
a wrong type or an out-of-range field is a 400. Every error, for every status
(400, 401, 404 for an unknown model or path, 405, 413, 415, 429 with
Retry-After when admission refuses, 500, 503 with Retry-After while no replica
can serve), is an OpenAI error object; 5xx bodies say nothing internal.

A client that disconnects, streaming or not, aborts its request: its blocks
are freed at the replica's next step.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Awaitable, Optional, TypeVar, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from folio.router.edge import REQUEST_ID_HEADER, AccessPolicy, EdgeMiddleware, request_key
from folio.router.engine_client import EngineClient
from folio.router.errors import ApiError, ErrorResponse, invalid_body
from folio.router.openai.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    TokenizerInfo,
)
from folio.router.openai_serving import Caller, OpenAIServing, StreamingResult
from folio.router.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

_ERRORS = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Invalid request: a malformed body, a wrong type, a field out of range",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Body too large",
        415: "Body is not JSON",
        429: "Admission refused; retry after Retry-After seconds",
        500: "Internal error",
        503: "No replica can serve now; retry after Retry-After seconds",
    }.items()
}
_BODIES = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)
_CHUNKS = (CompletionChunk, ChatCompletionChunk)


def build_app(serving: OpenAIServing, frontend: EngineClient, policy: Optional[AccessPolicy] = None) -> FastAPI:
    policy = policy or AccessPolicy()
    app = FastAPI(title="folio", docs_url=None, redoc_url=None)
    app.add_middleware(EdgeMiddleware, policy=policy, max_body_bytes=serving.limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        """Starlette's own answers (unknown path, wrong method) as OpenAI error objects."""
        err = ApiError(e.status_code, str(e.detail), code=f"http_{e.status_code}")
        return JSONResponse(err.body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_params(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, "invalid request parameters").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return JSONResponse(ApiError(500, "internal error").body(), status_code=500)

    @app.post(
        "/v1/completions", openapi_extra=_json_body(CompletionRequest), responses=_ok(Completion, CompletionChunk)
    )
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        return await _respond(request, serving.completions(body, _caller(request, policy)))

    @app.post(
        "/v1/chat/completions",
        openapi_extra=_json_body(ChatCompletionRequest),
        responses=_ok(ChatCompletion, ChatCompletionChunk),
    )
    async def chat(request: Request) -> Response:
        body = await _parse(request, ChatCompletionRequest)
        return await _respond(request, serving.chat(body, _caller(request, policy)))

    @app.get("/v1/models", responses=_ok(ModelList))
    async def models() -> Response:
        return JSONResponse(serving.models().model_dump())

    @app.get("/v1/models/{model_id:path}", responses=_ok(ModelCard))
    async def model(model_id: str) -> Response:
        return JSONResponse(serving.model(model_id).model_dump())

    @app.get("/tokenizer_info", responses=_ok(TokenizerInfo))
    async def tokenizer_info() -> Response:
        return JSONResponse(serving.tokenizer_info().model_dump())

    @app.post("/tokenize", openapi_extra=_json_body(TokenizeRequest), responses=_ok(TokenizeResponse))
    async def tokenize(request: Request) -> Response:
        return JSONResponse((await serving.tokenize(await _parse(request, TokenizeRequest))).model_dump())

    @app.post("/detokenize", openapi_extra=_json_body(DetokenizeRequest), responses=_ok(DetokenizeResponse))
    async def detokenize(request: Request) -> Response:
        return JSONResponse((await serving.detokenize(await _parse(request, DetokenizeRequest))).model_dump())

    # HEAD as well: load balancers and uptime checks probe with it.
    @app.get("/health", responses={503: _ERRORS[503]})
    @app.head("/health", responses={503: _ERRORS[503]})
    async def health() -> Response:
        """200 while some replica can serve; load balancers route on this."""
        if not frontend.ready:
            raise ApiError(503, "no replica is ready to serve", headers={"Retry-After": str(frontend.ready_in())})
        return JSONResponse({"status": "ok"})

    @app.get("/health/replicas", responses=_ERRORS)
    async def replicas() -> dict:
        """Every replica's state, for operators (addresses and errors stay in the log)."""
        return {"ready": frontend.ready, "replicas": _replica_states(frontend)}

    @app.get("/metrics", responses=_ERRORS)
    @app.head("/metrics", responses=_ERRORS)
    async def metrics() -> Response:
        return PlainTextResponse(frontend.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def openapi() -> dict:
        """FastAPI's document plus the request bodies the routes parse themselves and the
        chunks they stream."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version="0.1.0", routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            documented = [(m, "validation") for m in _BODIES] + [(m, "serialization") for m in _CHUNKS]
            for model, mode in documented:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return app


def _ok(body: type[BaseModel], chunk: Optional[type[BaseModel]] = None) -> dict:
    """The route's answers for the OpenAPI document: 200 with `body` (or, for a request
    with `stream`, server-sent events of `chunk`), and every error. Routes return the
    JSONResponse they built, so FastAPI documents these models but never validates or
    re-serializes an answer against them."""
    ok: dict = {"model": body, "description": f"A {body.__name__}"}
    if chunk is not None:
        ok["description"] += f"; with `stream`, server-sent events of {chunk.__name__}"
        events = (
            f"`data: <{chunk.__name__} JSON>` events (#/components/schemas/{chunk.__name__}); "
            "a failure mid-stream is an event with an error object; the last event is `data: [DONE]`"
        )
        ok["content"] = {"text/event-stream": {"schema": {"type": "string", "description": events}}}
    return {200: ok, **_ERRORS}


def _json_body(model: type[BaseModel]) -> dict:
    """The route's request body for the OpenAPI document (the route parses it itself, so
    that parsing is bounded and its errors are OpenAI error objects)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


async def _parse(request: Request, model: type[M]) -> M:
    body = await request.body()  # the edge has bounded its size
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise invalid_body(e) from None


def _caller(request: Request, policy: AccessPolicy) -> Caller:
    key = request_key(request.scope)
    given = request.headers.get(REQUEST_ID_HEADER.decode())  # the edge bounded its length
    if given:  # in the response id as printable ASCII; the header echo keeps its bytes
        safe = "".join(c if c.isascii() and c.isprintable() else "_" for c in given)
        display = f"{safe}-{uuid.uuid4().hex[:8]}"
    else:
        display = uuid.uuid4().hex
    return Caller(
        display_id=display,
        priority_allowed=policy.honours_priority(key),
        cache_salt=key.cache_salt if key is not None else None,
    )


def _replica_states(frontend: EngineClient) -> list[dict]:
    return [{"index": s.index, "state": s.state, "requests": s.num_requests} for s in frontend.replica_states()]


async def _respond(request: Request, work: Awaitable[Union[BaseModel, StreamingResult]]) -> Response:
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
        return Response(status_code=499)  # nobody reads it
    result = task.result()
    if isinstance(result, StreamingResult):
        # Starlette cancels the body on disconnect; the background task runs either way.
        return StreamingResponse(result.chunks, media_type="text/event-stream", background=BackgroundTask(result.close))
    return JSONResponse(result.model_dump())


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
