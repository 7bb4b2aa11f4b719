"""Replicas: N `levante serve` processes (or remote servers) behind one load-routing front.

`levante serve REF --replicas N` starts N engine processes, each a plain `levante serve` on
its own loopback port, and a front on the public host/port that proxies every path (OpenAI,
Ollama, the chat page) to one of them, streaming responses through unchanged. The front can
also sit over Levante servers on other machines (`--upstream http://host:port`, repeatable).

Routing: the replica with the fewest requests in flight; with prefix-aware routing a
conversation (the hash of its first two messages, or of a prompt's first 512 characters)
goes to the same replica each turn, so its prefix-cached KV blocks are reused, unless that
replica has `max_imbalance` more requests in flight than the least loaded one. Per-replica
counts (routed, in flight, failed) are at the front's /metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from levante.errors import ConfigError
from levante.server.config import ServerConfig
from levante.server.guards import GuardMiddleware
from levante.server.protocol import error_body

log = logging.getLogger(__name__)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "host",
                        "content-length"})
PROXY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
PROMPT_KEY_CHARS = 512


@dataclass
class Replica:
    """One upstream Levante server and the front's counts for it."""

    url: str
    num_in_flight: int = 0
    num_routed: int = 0


@dataclass
class Router:
    """Picks a replica: prefix-aware with a load bound, else the fewest in flight."""

    replicas: list[Replica]
    prefix_aware: bool = True
    max_imbalance: int = 2
    _turn: int = field(default=0, repr=False)

    def ranked(self, key: bytes | None) -> list[Replica]:
        """Replicas in the order to try them: the chosen one first, then by load."""
        self._turn += 1  # rotates among equally loaded replicas
        n = len(self.replicas)
        by_load = sorted(self.replicas, key=lambda r: (
            r.num_in_flight, (self.replicas.index(r) - self._turn) % n))
        if key is None or not self.prefix_aware:
            return by_load
        # Rendezvous hashing: a replica's rank for a key survives other replicas leaving.
        home = max(self.replicas, key=lambda r: hashlib.blake2b(
            key + r.url.encode(), digest_size=8).digest())
        if home.num_in_flight > by_load[0].num_in_flight + self.max_imbalance:
            return by_load
        return [home] + [r for r in by_load if r is not home]


def routing_key(body: bytes) -> bytes | None:
    """What identifies a conversation in a request body: its first messages, or the prompt's
    start; None for bodies without either (GETs, other JSON)."""
    return conversation_key(json_object(body))


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; {} if it is not one (the server answers that with a 400)."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def conversation_key(data: dict[str, Any]) -> bytes | None:
    """`routing_key` of a parsed body."""
    if isinstance(data.get("messages"), list):
        return json.dumps(data["messages"][:2], sort_keys=True).encode()
    prompt = data.get("prompt")
    if isinstance(prompt, (str, list)):
        return json.dumps(prompt[:PROMPT_KEY_CHARS]).encode()
    return None


class FrontMetrics:
    """Per-replica counters at the front's /metrics (its own registry)."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.registry = CollectorRegistry()
        self.routed = Counter("levante_front_requests_routed", "Requests sent to a replica",
                              ["replica"], registry=self.registry)
        self.failed = Counter("levante_front_requests_failed",
                              "Requests a replica could not take (connection errors)",
                              ["replica"], registry=self.registry)
        in_flight = Gauge("levante_front_requests_in_flight", "Requests a replica is serving",
                          ["replica"], registry=self.registry)
        for replica in replicas:
            self.routed.labels(replica.url)
            self.failed.labels(replica.url)
            in_flight.labels(replica.url).set_function(
                lambda r=replica: r.num_in_flight)  # type: ignore[misc]


def create_front(urls: list[str], *, config: ServerConfig | None = None,
                 prefix_aware: bool = True, timeout_s: float = 600.0) -> FastAPI:
    """The front app over Levante servers at `urls` (base URLs, no /v1).

    `config` supplies the guards every Levante server has (API key, loopback Host check,
    body limit); its model fields are unused.
    """
    if not urls:
        raise ConfigError("the front needs at least one replica or --upstream URL")
    config = config or ServerConfig(ref="front")
    router = Router([Replica(url.rstrip("/")) for url in urls], prefix_aware=prefix_aware)
    metrics = FrontMetrics(router.replicas)
    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0),
                               limits=httpx.Limits(max_connections=None))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="Levante front", lifespan=lifespan)
    app.state.router = router
    app.add_middleware(GuardMiddleware, config=config)
    _register_routes(app, router, metrics, client)
    return app


def _register_routes(app: FastAPI, router: Router, metrics: FrontMetrics,
                     client: httpx.AsyncClient) -> None:
    """/metrics and /health of the front itself; every other path goes to a replica."""

    @app.get("/metrics")
    async def front_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> Response:
        answers = await asyncio.gather(*(_is_healthy(client, r.url) for r in router.replicas))
        states = {r.url: ok for r, ok in zip(router.replicas, answers)}
        return JSONResponse({"replicas": states}, status_code=200 if any(states.values())
                            else 503)

    @app.api_route("/{path:path}", methods=PROXY_METHODS)
    async def proxy(request: Request, path: str) -> Response:
        body = await request.body()
        for replica in router.ranked(routing_key(body)):
            response = await _forward(client, replica, request, body, metrics)
            if response is not None:
                return response
        return JSONResponse(error_body("no replica could take the request",
                                       type_="server_error", code="no_replica"),
                            status_code=502)


async def _is_healthy(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(url + "/health", timeout=5.0)).status_code == 200
    except httpx.HTTPError:
        return False


async def _forward(client: httpx.AsyncClient, replica: Replica, request: Request, body: bytes,
                   metrics: FrontMetrics) -> Response | None:
    """Send the request to one replica and stream its answer back; None if unreachable."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    outgoing = client.build_request(request.method, replica.url + request.url.path,
                                    params=tuple(request.query_params.multi_items()),
                                    headers=headers, content=body)
    replica.num_in_flight += 1
    try:
        upstream = await client.send(outgoing, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        replica.num_in_flight -= 1
        metrics.failed.labels(replica.url).inc()
        log.warning("replica %s unreachable: %s", replica.url, e)
        return None
    replica.num_routed += 1
    metrics.routed.labels(replica.url).inc()

    async def release() -> None:  # however the response ends: done, failed, client gone
        await upstream.aclose()  # closing mid-stream makes the replica abort the request
        replica.num_in_flight -= 1

    back = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
    return _Relay(upstream.aiter_raw(), status_code=upstream.status_code, headers=back,
                  release=release)


class _Relay(StreamingResponse):
    """A streamed upstream answer that releases its replica once, even if never started."""

    def __init__(self, content: AsyncIterator[bytes], *, status_code: int,
                 headers: dict[str, str], release: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, status_code=status_code, headers=headers)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release()


@dataclass
class ReplicaSet:
    """Local `levante serve` processes, one per loopback port."""

    processes: list[subprocess.Popen[bytes]]
    urls: list[str]

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Until every replica answers /health; raises if one exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        pending = dict(zip(self.urls, self.processes))
        while pending:
            for url, process in list(pending.items()):
                if process.poll() is not None:
                    self.stop()
                    raise ConfigError(f"replica {url} exited with code {process.returncode} "
                                      "while starting (see its log above)")
                try:
                    if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                        del pending[url]
                except httpx.HTTPError:
                    pass  # not listening yet
            if pending and time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"replicas {sorted(pending)} not ready after {timeout_s} s")
            time.sleep(0.5)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every replica (they drain), then kill those still running."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_args(config: ServerConfig) -> list[str]:
    """The `levante serve` flags that give a replica `config`'s model and engine settings
    (host, port and the API key are the launcher's business)."""
    args = [config.ref, "--max-num-seqs", str(config.max_num_seqs),
            "--max-num-batched-tokens", str(config.max_num_batched_tokens),
            "--max-queue", str(config.max_queue), "--dtype", config.dtype,
            "--kv-cache-dtype", config.kv_cache_dtype,
            "--num-speculative-tokens", str(config.num_speculative_tokens),
            "--prefix-caching" if config.enable_prefix_caching else "--no-prefix-caching"]
    optional = {"--max-model-len": config.max_model_len,
                "--kv-cache-memory": config.kv_cache_memory,
                "--served-model-name": config.served_model_name,
                "--embedding-pooling": config.embedding_pooling}
    for flag, value in optional.items():
        if value is not None:
            args += [flag, str(value)]
    for name, path in config.lora:
        args += ["--lora", f"{name}={path}"]
    flags = [flag for flag, is_on in (("--no-web", config.no_web),
                                      ("--allow-local-paths", config.allow_local_paths)) if is_on]
    return args + flags


def start_replicas(config: ServerConfig, num_replicas: int, *,
                   extra_args: list[str] | None = None) -> ReplicaSet:
    """Start `num_replicas` `levante serve` processes with `config`'s settings (`serve_args`)
    on free loopback ports; `extra_args` go to each too (e.g. ["--tensor-parallel", "2"]).

    On a CPU the replicas share the cores: each gets cores / N threads unless
    OMP_NUM_THREADS is set. The API key travels by environment, not visible in `ps`.
    """
    if num_replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {num_replicas}")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_replicas)))
    if config.api_key:
        env["LEVANTE_API_KEY"] = config.api_key
    processes, urls = [], []
    for _ in range(num_replicas):
        port = _free_port()
        command = [sys.executable, "-m", "levante.cli", "serve", *serve_args(config),
                   "--host", "127.0.0.1", "--port", str(port), *(extra_args or [])]
        processes.append(subprocess.Popen(command, env=env))
        urls.append(f"http://127.0.0.1:{port}")
    return ReplicaSet(processes, urls)


def serve_replicas(config: ServerConfig, *, num_replicas: int,
                   upstreams: list[str] | None = None, prefix_aware: bool = True,
                   extra_args: list[str] | None = None) -> None:
    """`levante serve --replicas N [--upstream URL]...`: the front on config.host:port over
    N local engines (none if 0) and the Levante servers at `upstreams`."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    replicas = start_replicas(config, num_replicas, extra_args=extra_args) \
        if num_replicas else None
    try:
        if replicas is not None:
            replicas.wait_ready()
        urls = (replicas.urls if replicas else []) + list(upstreams or [])
        app = create_front(urls, config=config, prefix_aware=prefix_aware)
        log.info("front on %s:%d over %s", config.host, config.port, ", ".join(urls))
        # uvicorn re-raises SIGTERM to the previous handler after draining: make it an
        # exception so `finally` stops the replicas instead of orphaning them.
        signal.signal(signal.SIGTERM, raise_system_exit)
        uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    finally:
        if replicas is not None:
            replicas.stop()


def raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
