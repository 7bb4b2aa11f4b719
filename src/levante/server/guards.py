"""What every request passes around the routes: Host and API-key checks, request ids, and
an OpenAI-shaped 500 for anything unexpected."""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from levante.server.config import ServerConfig
from levante.server.hosts import is_allowed_host, is_loopback_bind
from levante.server.http import HTTPError, error_response

log = logging.getLogger(__name__)

# The chat page and its assets are public (it asks for the key); the API behind it is not.
PUBLIC_PATHS = ("/health", "/", "/static/app.js", "/static/style.css")


def guard_middleware(config: ServerConfig) -> Callable[..., Awaitable[Response]]:
    """API key (constant-time), DNS-rebinding Host check on loopback, body-size limit."""

    checks_host = is_loopback_bind(config.host)  # bound elsewhere, there is no Host check

    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                    ) -> Response:
        if checks_host:
            host = request.headers.get("host", "")
            if not is_allowed_host(host, config.allowed_hosts):
                return error_response(HTTPError(
                    403, f"Host header {host[:100]!r} is not a loopback name (others need "
                    "--allowed-hosts)", type_="invalid_request_error", code="forbidden_host"))
        if config.api_key and request.url.path not in PUBLIC_PATHS:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), config.api_key.encode()):
                return error_response(HTTPError(
                    401, "missing or invalid API key", type_="invalid_request_error",
                    code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            return error_response(HTTPError(
                413, f"request body is {length} bytes; the limit is {config.max_body_bytes}",
                type_="invalid_request_error", code="request_too_large"))
        return await call_next(request)

    return guard


class GuardMiddleware:
    """`guard_middleware` as plain ASGI. Not `app.middleware("http")`: Starlette's
    BaseHTTPMiddleware hides client disconnects from `request.is_disconnected()`, so a
    non-streaming request whose client left would run on to its end."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.guard = guard_middleware(config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        passed = Response()

        async def call_next(_: Request) -> Response:
            return passed

        response = await self.guard(Request(scope, receive), call_next)
        if response is passed:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)


class RequestIdMiddleware:
    """`x-request-id` on every response: the client's own (printable, <= 128 characters),
    else a fresh one, as vLLM and most API gateways do, so logs on both sides can be joined."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or ()).get(b"x-request-id", b"")
        ok = 0 < len(given) <= 128 and all(0x21 <= c < 0x7f for c in given)
        request_id = given if ok else uuid.uuid4().hex.encode()

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ())
                           if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class UnexpectedErrorMiddleware:
    """An unexpected exception becomes an OpenAI-shaped 500 here, logged with its traceback.
    Not an `Exception` handler: Starlette's ServerErrorMiddleware re-raises after answering,
    and uvicorn then closes the socket under the client (a reset instead of the 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            log.exception("unexpected error serving %s", scope.get("path"))
            if started:  # a stream already under way: closing it is all that is left
                raise
            await error_response(exc)(scope, receive, send)
