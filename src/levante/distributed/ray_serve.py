"""`levante serve --ray`: Levante engines as Ray Serve replicas behind Ray's HTTP proxy.

Two deployments, as Ray Serve LLM is built:

- `LevanteEngine` (`EngineReplica`, levante.distributed.ray_replica): N engines, each running the
  whole `levante serve` app in-process; Ray scales them between min and max replicas on
  ongoing requests, health-checks them, and routes each call with `ConversationAffinityRouter`
  (levante.distributed.ray_router) or Ray's own prefix-tree router.
- `LevanteIngress` (`Ingress`): the FastAPI app behind Ray's proxy. It applies the guards
  (Host, API key, body size), forwards every path to an engine through a deployment handle and
  relays the answer as it streams. A request whose replica dies before answering is sent again
  to another (a stream dies after its head: it ends with an error event, SSE or NDJSON);
  a request no replica takes within `placement_timeout_s`, or past `max_queued_requests`,
  gets a 503 with Retry-After. /metrics counts routing, retries, refusals and replica states.

On a Ray cluster (`ray start --head` / `ray start --address`; RAY_ADDRESS set), `levante serve
--ray` deploys there; otherwise it starts a local one. `serve run` takes `app_builder`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from levante.distributed.ray_replica import EngineReplica, ProxiedRequest, ResponseHead
from levante.distributed.replicas import HOP_BY_HOP, PROXY_METHODS
from levante.errors import ConfigError
from levante.server.config import ServerConfig
from levante.server.guards import GuardMiddleware
from levante.server.http import HTTPError, error_response
from levante.server.protocol import error_body

log = logging.getLogger(__name__)
APP_NAME = "levante"
ENGINE_DEPLOYMENT = "LevanteEngine"
MAX_ATTEMPTS = 3  # a request's tries when replicas die under it
RETRYABLE = (RayActorError, ReplicaUnavailableError)  # died or left before answering
ROUTERS = {"conversation": "levante.distributed.ray_router.ConversationAffinityRouter",
           "prefix-tree": "ray.serve.llm.request_router.PrefixCacheAffinityRouter",
           "pow2": "ray.serve._private.request_router.pow_2_router."
                   "PowerOfTwoChoicesRequestRouter"}


@dataclass(frozen=True)
class RayServeConfig:
    """How the engines scale, route and reserve resources under Ray Serve."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0  # per replica, what the autoscaler aims at
    tensor_parallel: int = 1
    num_cpus: float = 1.0  # per rank
    num_gpus: float = 0.0  # per rank
    router: str = "conversation"  # a key of ROUTERS
    max_queued_requests: int = 256  # waiting for a replica; past it: 503
    placement_timeout_s: float = 30.0  # waiting for a replica at all; then: 503
    health_check_period_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"replicas must satisfy 0 <= min ({self.min_replicas}) <= max "
                              f"({self.max_replicas}), max >= 1")
        if self.router not in ROUTERS:
            raise ConfigError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        for name in ("target_ongoing_requests", "placement_timeout_s", "health_check_period_s",
                     "tensor_parallel", "max_queued_requests"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


class IngressMetrics(Collector):
    """The ingress's /metrics: requests routed per replica, retried, refused; replica states
    (read from Ray Serve's controller at scrape time)."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.routed = Counter("levante_ray_requests_routed", "Requests a replica answered",
                              ["replica"], registry=r)
        self.failed = Counter("levante_ray_replica_failures",
                              "Requests whose replica died or left under them", ["stage"],
                              registry=r)
        self.retried = Counter("levante_ray_requests_retried",
                               "Requests sent again after their replica failed", registry=r)
        self.refused = Counter("levante_ray_requests_refused", "Requests answered 503",
                               ["reason"], registry=r)
        r.register(self)

    def collect(self) -> list[Metric]:
        gauge = GaugeMetricFamily("levante_ray_replicas", "Engine replicas by Ray Serve state",
                                  labels=["state"])
        for state, count in replica_states(self.app_name).items():
            gauge.add_metric([state], count)
        return [gauge]


def replica_states(app_name: str) -> dict[str, int]:
    """The engine replicas of app `app_name` by Ray Serve state (RUNNING, STARTING, ...)."""
    app_status = serve.status().applications.get(app_name)
    deployment = app_status.deployments.get(ENGINE_DEPLOYMENT) if app_status else None
    return {str(getattr(state, "value", state)): count
            for state, count in (deployment.replica_states if deployment else {}).items()}


class _Unplaced(Exception):
    """No replica took the request in time, or the queue for one is full."""


def _error_tail(content_type: str, message: str) -> bytes:
    """How a stream that lost its replica ends: an error event then [DONE] (SSE), an error
    line (NDJSON), nothing for other bodies (their length no longer matches)."""
    if content_type.startswith("text/event-stream"):
        body = error_body(message, type_="server_error", code="replica_failed")
        return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
    if "ndjson" in content_type:
        return (json.dumps({"error": message}) + "\n").encode()
    return b""


def ingress_app(engines: DeploymentHandle, config: ServerConfig,
                ray_config: RayServeConfig, *, app_name: str = APP_NAME) -> FastAPI:
    """The ingress's app: guards, /metrics, /health, and every other path to an engine."""
    metrics = IngressMetrics(app_name)
    app = FastAPI(title="Levante on Ray Serve")
    app.add_middleware(GuardMiddleware, config=config)
    respond = engines.options(stream=True).respond

    @app.get("/metrics")
    async def ingress_metrics() -> Response:
        text = await asyncio.to_thread(generate_latest, metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> Response:
        states = await asyncio.to_thread(replica_states, app_name)
        return JSONResponse({"replicas": states},
                            status_code=200 if states.get("RUNNING") else 503)

    async def place(request: ProxiedRequest) -> tuple[ResponseHead, DeploymentResponseGenerator]:
        """The request's head from a replica, with its body stream. A replica that dies
        before answering: sent to another. A retry waits (up to the placement timeout) for
        room in a full queue, where a new request is refused at once."""
        deadline = time.monotonic() + ray_config.placement_timeout_s
        num_failures = 0
        while True:
            try:
                return await _start(respond, request, max(0.1, deadline - time.monotonic()))
            except RETRYABLE as e:
                num_failures += 1
                metrics.failed.labels("before_answer").inc()
                log.warning("replica failed before answering (try %d): %s", num_failures,
                            str(e).splitlines()[0])
                if num_failures == MAX_ATTEMPTS:
                    raise _Unplaced(f"{MAX_ATTEMPTS} replicas failed under the request") from e
                metrics.retried.inc()
            except BackPressureError:
                if not num_failures or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    @app.api_route("/{path:path}", methods=PROXY_METHODS)
    async def proxy(request: Request, path: str) -> Response:
        try:
            body = await _read_body(request, config.max_body_bytes)
        except HTTPError as e:
            return error_response(e)
        proxied = ProxiedRequest.of(request.method, request.url.path,
                                    request.scope.get("query_string", b""),
                                    tuple(request.scope["headers"]), body)
        try:
            head, stream = await place(proxied)
        except RayTaskError as e:  # the replica's app raised past its own 500 handler
            return error_response(e.as_instanceof_cause())
        except (_Unplaced, BackPressureError) as e:
            reason = "backpressure" if isinstance(e, BackPressureError) else "no_replica"
            metrics.refused.labels(reason).inc()
            return JSONResponse(error_body(f"no replica can take the request now ({e}); "
                                           "retry later", type_="server_overloaded",
                                           code=reason),
                                status_code=503, headers={"Retry-After": "1"})
        metrics.routed.labels(head.replica).inc()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers
                   if k.decode("latin-1").lower() not in HOP_BY_HOP}
        headers["x-levante-replica"] = head.replica
        return StreamingResponse(_relay(stream, headers.get("content-type", ""), metrics),
                                 status_code=head.status, headers=headers)

    return app


async def _start(respond: DeploymentHandle, request: ProxiedRequest, timeout_s: float
                 ) -> tuple[ResponseHead, DeploymentResponseGenerator]:
    """Choose a replica (within `timeout_s`), dispatch, and wait for the response's head."""
    chooser = respond.choose_replica(request)
    try:
        selection = await asyncio.wait_for(chooser.__aenter__(), timeout_s)
    except asyncio.TimeoutError:
        raise _Unplaced(f"none became free within {timeout_s:g} s") from None
    stream = respond.dispatch(selection, request)
    assert isinstance(stream, DeploymentResponseGenerator), "respond is a streaming call"
    try:
        head = await stream.__anext__()
    except BaseException as e:
        stream.cancel()
        await chooser.__aexit__(type(e), e, e.__traceback__)
        raise
    await chooser.__aexit__(None, None, None)
    assert isinstance(head, ResponseHead), "a replica's first item is its response head"
    return head, stream


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused while read past `limit` (a chunked body declares no length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body is over {limit} bytes (the limit)",
                            type_="invalid_request_error", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _relay(stream: DeploymentResponseGenerator, content_type: str,
                 metrics: IngressMetrics) -> AsyncIterator[bytes]:
    """The replica's body chunks; if it dies mid-way, `_error_tail`. Leaving early (the
    client went away) cancels the call, so the replica aborts the request."""
    try:
        async for chunk in stream:
            yield chunk
    except RETRYABLE as e:
        metrics.failed.labels("while_streaming").inc()
        log.warning("replica failed mid-response: %s", str(e).splitlines()[0])
        yield _error_tail(content_type, "the replica serving this request failed; retry it")
    except RayTaskError as e:  # the replica's app raised mid-body: the status is sent
        log.error("replica error mid-response: %s", str(e).splitlines()[0])
        yield _error_tail(content_type, "internal server error")
    finally:
        stream.cancel()


@serve.ingress()
class Ingress:
    """The ingress deployment body: holds the engines' handle; its app is `ingress_app`."""

    def __init__(self, engines: DeploymentHandle, config: ServerConfig,
                 ray_config: RayServeConfig) -> None:
        self.engines, self.config, self.ray_config = engines, config, ray_config

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ingress_app(self.engines, self.config, self.ray_config,
                           app_name=serve.get_replica_context().app_name)


def build_app(config: ServerConfig, ray_config: RayServeConfig) -> Any:
    """The Ray Serve application: the ingress bound to the engine deployment."""
    tp = ray_config.tensor_parallel
    scaling: dict[str, Any] = {"num_replicas": ray_config.min_replicas} \
        if ray_config.min_replicas == ray_config.max_replicas else {"autoscaling_config": {
            "min_replicas": ray_config.min_replicas, "max_replicas": ray_config.max_replicas,
            "target_ongoing_requests": ray_config.target_ongoing_requests}}
    rank = {"CPU": ray_config.num_cpus, **({"GPU": ray_config.num_gpus}
                                            if ray_config.num_gpus else {})}
    if tp > 1:  # one bundle per rank: rank 0 (the replica) in the first, ray_ranks the rest
        scaling |= {"placement_group_bundles": [rank] * tp, "placement_group_strategy": "PACK"}
    engines = serve.deployment(name=ENGINE_DEPLOYMENT)(EngineReplica).options(
        **scaling,
        ray_actor_options={"num_cpus": ray_config.num_cpus, "num_gpus": ray_config.num_gpus},
        max_ongoing_requests=2 * config.max_num_seqs,  # running, plus one batch waiting
        max_queued_requests=ray_config.max_queued_requests,
        health_check_period_s=ray_config.health_check_period_s,
        health_check_timeout_s=max(5.0, 3 * ray_config.health_check_period_s),
        graceful_shutdown_timeout_s=config.drain_timeout,
        request_router_config=RequestRouterConfig(  # a class or its import path
            request_router_class=ROUTERS[ray_config.router]))  # type: ignore[arg-type]
    ingress = serve.deployment(name="LevanteIngress")(Ingress).options(
        num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.max_connections)
    rank_resources = (ray_config.num_cpus, ray_config.num_gpus) if tp > 1 else None
    return ingress.bind(engines.bind(config, tp, rank_resources), config, ray_config)


def app_builder(args: dict[str, Any]) -> Any:
    """For `serve run levante.distributed.ray_serve:app_builder ref=smollm2 max_replicas=4`
    (or a Serve config file's `args`): ServerConfig's and RayServeConfig's fields by name."""
    kinds = {f.name: str(f.type) for cls in (ServerConfig, RayServeConfig) for f in fields(cls)
             if f.init}
    unknown = set(args) - set(kinds)
    if unknown:
        raise ConfigError(f"unknown app_builder args: {', '.join(sorted(unknown))}")
    typed = {k: _coerce(k, v, kinds[k]) for k, v in args.items()}
    ray_names = {f.name for f in fields(RayServeConfig)}
    return build_app(ServerConfig(**{k: v for k, v in typed.items() if k not in ray_names}),
                     RayServeConfig(**{k: v for k, v in typed.items() if k in ray_names}))


def _coerce(name: str, value: Any, kind: str) -> Any:
    """A `key=value` string from `serve run` as its field's type (`kind`, e.g. "int | None")."""
    if not isinstance(value, str):
        return value  # typed already (a config file)
    base = kind.split("|")[0].strip()
    try:
        if base == "bool":
            return value.lower() in ("1", "true", "yes", "on")
        return {"int": int, "float": float}.get(base, str)(value)
    except ValueError:
        raise ConfigError(f"app_builder arg {name}: {value!r} is not a {base}") from None


def serve_ray(config: ServerConfig, ray_config: RayServeConfig) -> None:
    """Deploy on the Ray cluster at RAY_ADDRESS (else a local one), serve on config.host:port
    through Ray's proxy until SIGTERM/SIGINT, then remove the app (and stop a local Ray)."""
    import ray

    from levante.server.app import check_port_free

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_port_free(config.host, config.port)
    is_local = not os.environ.get("RAY_ADDRESS")
    ray.init(include_dashboard=False, num_cpus=os.cpu_count() if is_local else None)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config, ray_config), name=APP_NAME, route_prefix="/")
        log.info("Ray Serve: %s on http://%s:%d (replicas %d-%d, tensor parallel %d)",
                 config.ref, config.host, config.port, ray_config.min_replicas,
                 ray_config.max_replicas, ray_config.tensor_parallel)
        stop.wait()
    finally:
        # Bounded: a terminal's Ctrl-C or systemd's stop reaches Ray's own processes too, and
        # Serve's calls then wait forever for a controller that is gone.
        cleanup = threading.Thread(target=serve.shutdown if is_local else serve.delete,
                                   args=() if is_local else (APP_NAME,), daemon=True)
        cleanup.start()
        cleanup.join(config.drain_timeout + 10)
        if is_local:
            ray.shutdown()
