"""The OpenAI-compatible HTTP server (issue 5, server half; spec architecture.md §3 `serve/`).

`build_app(engine, ...)` returns a FastAPI app with `/v1/chat/completions`,
`/v1/completions`, `/v1/models`, `/health` and `/metrics`. The app holds no model or cache
logic: it parses requests (`protocol.py`), renders prompts (`chat.py`, `tools.py`), submits
engine requests (`generation.py`) and formats answers.

Robustness (acceptance 3): a pure-ASGI gate in front of the routes answers 401 (missing or
wrong `Authorization: Bearer` when an API key is set; `/health` and `/metrics` stay open), 503
(shutting down) and 413 (declared body too large) before a handler runs; handlers answer 400
for bodies that are not UTF-8 or JSON or fail the schema, and 404 for an unknown model. Every
error has an OpenAI JSON body; an unexpected exception is a 500 with one, never a traceback.
The lifespan starts the engine and, on shutdown, stops new requests (503) and calls
`engine.shutdown()`, which lets running requests finish or aborts them after its grace period.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from minicpm4.serve import metrics
from minicpm4.serve.chat import ChatCompletion
from minicpm4.serve.completions import Completion
from minicpm4.serve.errors import APIError, error_body, error_bytes, from_validation
from minicpm4.serve.generation import SSE_DONE, ClientDisconnected, sse, until_disconnected
from minicpm4.serve.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("minicpm4.serve")
M = TypeVar("M", bound=BaseModel)
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
OPEN_PATHS = ("/health", "/metrics")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServerState:
    engine: Any
    model_names: tuple[str, ...]
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    default_max_tokens: int | None = None
    draining: bool = False
    started: float = field(default_factory=time.time)
    http_requests: Counter = field(default_factory=Counter)


class _Gate:
    """ASGI middleware: auth, draining, declared body size, and the HTTP request counter."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.state.api_key is None:
            return True
        given = headers.get(b"authorization", b"")
        want = b"Bearer " + self.state.api_key.encode()
        return hmac.compare_digest(given, want)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        status = [500]

        async def send_and_count(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            rejection = self._check(path, dict(scope.get("headers") or []))
            if rejection is not None:
                code, message, extra = rejection
                await send_and_count({"type": "http.response.start", "status": code,
                                      "headers": [(b"content-type", b"application/json"),
                                                  *extra]})
                await send_and_count({"type": "http.response.body",
                                      "body": error_bytes(code, message)})
                return
            await self.app(scope, receive, send_and_count)
        finally:
            route = path if path in ROUTES else "other"
            self.state.http_requests[(route, status[0])] += 1

    def _check(self, path: str, headers: dict[bytes, bytes]
               ) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        if path in OPEN_PATHS:
            return None
        if not self._authorized(headers):
            return (401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                    [(b"www-authenticate", b"Bearer")])
        if self.state.draining:
            return 503, "the server is shutting down", []
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return 400, "invalid Content-Length header", []
            if declared > self.state.max_request_bytes:
                return (413, f"request body of {declared} bytes exceeds the limit of "
                        f"{self.state.max_request_bytes}", [(b"connection", b"close")])
        return None


async def _read_json(request: Request, state: ServerState, schema: type[M]) -> M:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > state.max_request_bytes:
            raise APIError(413, f"request body exceeds the limit of {state.max_request_bytes} "
                           "bytes")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})",
                       code="invalid_utf8") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"malformed JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise APIError(400, "JSON nested too deeply", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from exc


def _check_model(state: ServerState, name: str | None) -> str:
    if name is None:
        return state.model_names[0]
    if name not in state.model_names:
        raise APIError(404, f"the model '{name}' does not exist; this server serves "
                       f"{', '.join(state.model_names)}", param="model",
                       code="model_not_found")
    return name


async def _guarded(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An SSE body that never dies mid-stream without a word: an engine error becomes an
    `error` event followed by `[DONE]`."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as exc:
        yield sse(exc.body())
        yield SSE_DONE
    except Exception:
        log.exception("generation failed while streaming")
        yield sse(error_body(500, "internal error while generating"))
        yield SSE_DONE


async def _answer(request: Request, state: ServerState, job: ChatCompletion | Completion,
                  stream: bool) -> Response:
    choices = await until_disconnected(request, job.start())
    if stream:
        return StreamingResponse(_guarded(job.stream(choices)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    body = await until_disconnected(request, job.complete(choices))
    if any(c.get("finish_reason") == "abort" for c in body["choices"]):
        raise APIError(503, "the request was aborted (server shutting down)")
    return JSONResponse(body)


def build_app(engine: Any, *, api_key: str | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              served_model_names: tuple[str, ...] | None = None,
              default_max_tokens: int | None = None, manage_engine: bool = True) -> FastAPI:
    """The FastAPI app serving `engine` (an `AsyncEngine`). `manage_engine`: the app's
    lifespan calls `engine.start()` and `engine.shutdown()`."""
    state = ServerState(engine=engine,
                        model_names=tuple(served_model_names or (engine.model_name,)),
                        api_key=api_key or None, max_request_bytes=max_request_bytes,
                        default_max_tokens=default_max_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            await engine.start()
        try:
            yield
        finally:
            state.draining = True
            if manage_engine:
                await engine.shutdown()

    app = FastAPI(title="minicpm4", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serve = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; counted in /metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(400, str(exc.errors()[:1])), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, "internal server error"), status_code=500)

    def prepare(make: Any, req: Any) -> Any:
        model = _check_model(state, req.model)
        try:
            return make(engine, req, model, default_max_tokens=state.default_max_tokens)
        except ValueError as exc:  # SamplingParams ranges, tokenizer, chat template
            raise APIError(400, str(exc), code="invalid_value") from exc
        except RecursionError as exc:  # absurdly nested tool schemas
            raise APIError(400, "request nested too deeply", code="invalid_value") from exc

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _read_json(request, state, ChatCompletionRequest)
        return await _answer(request, state, prepare(ChatCompletion, req), req.stream)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await _read_json(request, state, CompletionRequest)
        return await _answer(request, state, prepare(Completion, req), req.stream)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(state.started),
                "owned_by": "minicpm4", "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in state.model_names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        return model_card(_check_model(state, name))

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        text = metrics.render(engine.stats(), state.http_requests,
                              labels={"model_name": state.model_names[0]})
        return Response(text, media_type=metrics.CONTENT_TYPE)

    return app

