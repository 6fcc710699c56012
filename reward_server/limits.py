"""Request limits, error bodies and request metrics as plain ASGI middleware.

Every error the server returns has one shape, FastAPI's own: ``{"detail": [{"loc": [...], "msg": ...,
"type": ...}]}``, where ``loc`` names the field (``["body", "items", 3, "response"]``) or the limit
(``["body"]`` for the body size). Status codes follow what trainers' clients do with them: 4xx means
"your request is wrong, do not retry" (400 malformed JSON, 413 too large, 415 a body declared as something
other than JSON, 422 invalid), 503 + Retry-After means "try again shortly" (verl's reward client retries
5xx only).

The body limit is enforced before FastAPI parses anything: a declared Content-Length over the limit is
refused at once, and a chunked body is counted while it streams in, so a huge body is never buffered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from reward_server.metrics import ServerMetrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ApiError(Exception):
    """An error answered with ``status`` and one ``detail`` entry naming ``loc``."""

    def __init__(
        self, status: int, loc: list[Any], msg: str, kind: str, headers: dict[str, str] | None = None
    ):
        super().__init__(msg)
        self.status, self.loc, self.msg, self.kind = status, loc, msg, kind
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.loc, self.msg, self.kind, self.headers)


def error_response(
    status: int, loc: list[Any], msg: str, kind: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"detail": [{"loc": loc, "msg": msg, "type": kind}]}
    return JSONResponse(body, status_code=status, headers=headers)


async def api_error_handler(_: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, ApiError)
    return err.response()


async def internal_error_handler(_: Request, err: Exception) -> JSONResponse:
    """500 as JSON (a bug, not the caller's fault: clients may retry)."""
    return error_response(500, [], f"internal error: {type(err).__name__}: {err}"[:500], "internal_error")


async def http_error_handler(_: Request, err: Exception) -> JSONResponse:
    """FastAPI's and Starlette's own HTTPExceptions (404, 405, a body that is valid JSON to nobody)
    in the one error shape: their ``detail`` is a string, ours a list naming ``loc``.

    FastAPI answers 400 "There was an error parsing the body" for any body parse failure that is not
    a ``JSONDecodeError`` — e.g. ``RecursionError`` on a deeply nested array — so the cause is named.
    """
    assert isinstance(err, StarletteHTTPException)
    if isinstance(err.detail, list):
        return JSONResponse({"detail": err.detail}, status_code=err.status_code, headers=err.headers)
    if err.status_code == 400 and err.__cause__ is not None:
        cause = err.__cause__
        reason = "nested too deeply" if isinstance(cause, RecursionError) else f"{type(cause).__name__}"
        msg = f"malformed JSON: the body could not be parsed ({reason}: {cause})"[:500]
        return error_response(400, ["body"], msg, "json_invalid", err.headers)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return error_response(err.status_code, [], str(err.detail), kind, err.headers)


async def validation_error_handler(_: Request, err: Exception) -> JSONResponse:
    """422 with the field paths pydantic found; malformed JSON is a 400 with the parser's message."""
    assert isinstance(err, RequestValidationError)
    errors = list(err.errors())
    for e in errors:
        if e.get("type") == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", "invalid JSON")
            position = e.get("loc", [None, None])[-1]
            msg = f"malformed JSON: {reason} (at character {position})"
            return error_response(400, ["body"], msg, "json_invalid")
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    return JSONResponse({"detail": detail}, status_code=422)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` with 413, without reading (or buffering) them."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self, size: int | str) -> JSONResponse:
        msg = f"request body is {size} bytes; the limit is max_body_bytes={self.max_body_bytes}"
        return error_response(413, ["body"], msg, "body_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(int(declared))(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(f"more than {self.max_body_bytes}")(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def is_json_media_type(content_type: bytes | None) -> bool:
    """True for no Content-Type (read as JSON), ``application/json`` and ``application/*+json``,
    parameters (``; charset=utf-8``) and case ignored.

    >>> [is_json_media_type(t) for t in (None, b"application/json; charset=utf-8", b"text/plain")]
    [True, True, False]
    """
    if content_type is None:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class JsonContentTypeMiddleware:
    """415 naming the Content-Type for a POST body that is declared as something other than JSON; a body
    without a Content-Type is read as JSON.

    FastAPI parses neither and reports both as 422 "Input should be a valid dictionary", which sends the
    caller looking at their fields rather than their header."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            declared = dict(scope.get("headers") or []).get(b"content-type")
            if not is_json_media_type(declared):
                assert declared is not None
                text = declared.decode("latin-1")
                msg = f"Content-Type {text!r} is not JSON: send the body as JSON, Content-Type: application/json"
                await error_response(415, ["header", "content-type"], msg, "unsupported_media_type")(
                    scope, receive, send
                )
                return
            if declared is None:
                headers = [*scope.get("headers", []), (b"content-type", b"application/json")]
                scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


class MetricsMiddleware:
    """Count requests by (route template, status) and observe latency; outermost, so 413s count too."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - start)


def json_size(obj: Any) -> int:
    """Bytes of ``obj`` as compact JSON (used by tests and the benchmark to size requests)."""
    return len(json.dumps(obj, separators=(",", ":")).encode())
