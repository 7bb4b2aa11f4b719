"""How the HTTP listener runs: uvicorn with read timeouts, a connection bound, and a drain."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from levante.engine.async_engine import AsyncEngine
from levante.server.config import ServerConfig
from levante.server.protocol import error_body

log = logging.getLogger(__name__)


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI app a connection past the bound is served by: one OpenAI-shaped 503."""
    body = json.dumps(error_body("the server has too many open connections; retry later",
                                 type_="server_overloaded", code="too_many_connections"))
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body.encode()})


class ReadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the two read deadlines it lacks (slowloris): a request's
    headers must arrive within `header_timeout` seconds of the connection (or of the previous
    response), and its body within `body_timeout` of the headers; else the connection is
    closed, as nginx's client_header_timeout/client_body_timeout do. uvicorn's own
    timeout_keep_alive covers only an idle connection between requests.

    Past `max_connections` open connections, a new one gets an OpenAI-shaped 503 for its
    request and is closed (uvicorn's limit_concurrency answers in plain text)."""

    def __init__(self, *args: Any, header_timeout: float, body_timeout: float,
                 max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self._deadline: asyncio.TimerHandle | None = None
        self._timed_cycle: Any = None  # the request whose body the deadline is for

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("refusing a request from %s: %d connections are open "
                        "(--max-connections)", self.client, len(self.connections) - 1)
            self.app = _too_many_connections
        self._arm(self.header_timeout, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        previous = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not previous:  # headers of a new request
            self._disarm()
            if self.cycle.more_body:
                self._timed_cycle = self.cycle
                self._arm(self.body_timeout, "body")
        elif self._timed_cycle is not None and not self._timed_cycle.more_body:
            self._disarm()  # the body is in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()
        if not self.transport.is_closing():
            self._arm(self.header_timeout, "headers")

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._timed_cycle = None

    def _expire(self, what: str) -> None:
        self._deadline = None
        if self._timed_cycle is not None and self._timed_cycle.more_body is False:
            return
        log.info("closing a connection from %s: its request %s did not arrive in time",
                 self.client, what)
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on SIGTERM/SIGINT before it stops: new generation requests get a
    503 with Retry-After and /health turns 503 (a balancer sends traffic elsewhere); the
    requests already accepted run on for up to `drain_timeout` seconds; then those left end
    with an error (a stream: an error event and `[DONE]`; a plain request: a 503). A second
    signal ends the drain at once."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, *,
                 drain_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is None and sig in (signal.SIGTERM, signal.SIGINT):
            log.info("draining: %d request(s) have up to %.0f s to finish",
                     self.engine.num_active, self.drain_timeout)
            self.engine.begin_drain()
            self.drain_deadline = time.monotonic() + self.drain_timeout
            return
        self.drain_deadline = time.monotonic()  # a second signal: stop now
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if self.engine.num_active == 0:
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                log.warning("drain deadline: ending %d request(s) with an error",
                            self.engine.num_active)
                self.engine.end_all("the server is shutting down: the request did not finish "
                                    "within the drain period; retry it")
                self.should_exit = True
        return await super().on_tick(counter)


def build_server(app: Any, config: ServerConfig, engine: AsyncEngine, *,
                 log_level: str = "info") -> DrainingServer:
    """The uvicorn server for `app` with the config's timeouts, connection bound and drain."""
    uvicorn_config = listener_config(app, config, log_level=log_level,
                                     timeout_graceful_shutdown=5)  # to flush the last events
    return DrainingServer(uvicorn_config, engine, drain_timeout=config.drain_timeout)


def listener_config(app: Any, config: ServerConfig, *, log_level: str = "info",
                    timeout_graceful_shutdown: int) -> uvicorn.Config:
    """uvicorn's config for `app` on config.host:port with the read deadlines and connection
    bound (`ReadTimeoutH11Protocol`); on a stop, requests in flight get
    `timeout_graceful_shutdown` seconds."""
    protocol = functools.partial(ReadTimeoutH11Protocol, header_timeout=config.header_timeout,
                                 body_timeout=config.body_timeout,
                                 max_connections=config.max_connections)
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                          http=protocol, timeout_graceful_shutdown=timeout_graceful_shutdown)
