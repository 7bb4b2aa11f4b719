"""The ingress app in front of the engine replicas' handle: guards, retries, relayed streams.

It applies the guards (Host, API key, body size), forwards every path to an engine replica
(`EngineReplica.respond`, levante.distributed.ray_replica) through a deployment handle and
relays the answer as it streams. A request whose replica dies before answering is sent again
to another (a stream dies after its head: it ends with an error event, SSE or NDJSON); a
request no replica takes within `placement_timeout_s`, or one that finds `max_queued_requests`
others waiting for a replica, gets a 503 with Retry-After. /metrics counts routing, retries,
refusals and replica states. levante.distributed.ray_serve serves it from the `levante serve`
process or as the ingress deployment behind Ray's proxy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from levante.distributed.ray_replica import ProxiedRequest, ResponseHead
from levante.distributed.replicas import HOP_BY_HOP, PROXY_METHODS
from levante.server.config import ServerConfig
from levante.server.guards import GuardMiddleware
from levante.server.http import HTTPError, error_response
from levante.server.protocol import error_body

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # a request's tries when replicas die under it
RETRYABLE = (RayActorError, ReplicaUnavailableError)  # died or left before answering


class IngressMetrics(Collector):
    """The ingress's /metrics: requests routed per replica, retried, refused; replica states
    (read from Ray Serve's controller at scrape time)."""

    def __init__(self, engines: DeploymentHandle) -> None:
        self.engines = engines
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
        for state, count in replica_states(self.engines).items():
            gauge.add_metric([state], count)
        return [gauge]


def replica_states(engines: DeploymentHandle) -> dict[str, int]:
    """The replicas of the `engines` deployment by Ray Serve state (RUNNING, STARTING, ...)."""
    app_status = serve.status().applications.get(engines.app_name)
    deployment = app_status.deployments.get(engines.deployment_name) if app_status else None
    return {str(getattr(state, "value", state)): count
            for state, count in (deployment.replica_states if deployment else {}).items()}


class _Unplaced(Exception):
    """No replica took the request in time, or 3 died under it."""


class _QueueFull(Exception):
    """`max_queued_requests` requests are waiting for a replica already."""


def _error_tail(content_type: str, message: str) -> bytes:
    """How a stream that lost its replica ends: an error event then [DONE] (SSE), an error
    line (NDJSON), nothing for other bodies (their length no longer matches)."""
    if content_type.startswith("text/event-stream"):
        body = error_body(message, type_="server_error", code="replica_failed")
        return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
    if "ndjson" in content_type:
        return (json.dumps({"error": message}) + "\n").encode()
    return b""


def ingress_app(engines: DeploymentHandle, config: ServerConfig, *,
                placement_timeout_s: float, max_queued_requests: int) -> FastAPI:
    """The ingress's app: guards, /metrics, /health, and every other path to an engine."""
    metrics = IngressMetrics(engines)
    # Requests sent and not yet accepted by a replica. Ray's router has the same bound
    # (max_queued_requests on the deployment) but checks it before an await and counts the
    # request after it, so a burst passes it whole: 16 streams over 8 slots + 8 queued all
    # waited out the placement timeout in CI. Counted here before any await, a burst is cut
    # at the bound (as Ray's check means to, it may refuse a few that a slot freed by then
    # could have taken).
    unplaced = 0
    app = FastAPI(title="Levante on Ray Serve")
    app.add_middleware(GuardMiddleware, config=config)
    # Over gRPC to the replica (as Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED mode does), not as a
    # Ray actor task whose streamed items are objects: ~4 ms less a request on 2 cores.
    respond = engines.options(stream=True, _by_reference=False).respond

    @app.get("/metrics")
    async def ingress_metrics() -> Response:
        text = await asyncio.to_thread(generate_latest, metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> Response:
        states = await asyncio.to_thread(replica_states, engines)
        return JSONResponse({"replicas": states},
                            status_code=200 if states.get("RUNNING") else 503)

    async def place(request: ProxiedRequest) -> tuple[ResponseHead, DeploymentResponseGenerator]:
        """The request's head from a replica, with its body stream. A replica that dies
        before answering: sent to another. A retry waits (up to the placement timeout) for
        room in a full queue, where a new request is refused at once. The placement timeout
        starts again after a failure: time served by the dead replica was not time waiting."""
        nonlocal unplaced
        if unplaced >= max_queued_requests:
            raise _QueueFull(f"{unplaced} requests are waiting for a replica")
        deadline = time.monotonic() + placement_timeout_s
        num_failures = 0
        while True:
            try:
                unplaced += 1
                try:
                    stream = await _assigned(respond, request,
                                             max(0.1, deadline - time.monotonic()))
                finally:
                    unplaced -= 1
                return await _head(stream), stream
            except RETRYABLE as e:
                deadline = time.monotonic() + placement_timeout_s
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
        except (_Unplaced, _QueueFull, BackPressureError) as e:
            reason = "no_replica" if isinstance(e, _Unplaced) else "backpressure"
            metrics.refused.labels(reason).inc()
            return JSONResponse(error_body(f"no replica can take the request now ({e}); "
                                           "retry later", type_="server_overloaded",
                                           code=reason),
                                status_code=503, headers={"Retry-After": "1"})
        metrics.routed.labels(head.replica).inc()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers
                   if k.decode("latin-1").lower() not in HOP_BY_HOP}
        headers["x-levante-replica"] = head.replica
        if head.is_complete:  # the call ends by itself: nothing to relay or cancel
            return Response(head.body, status_code=head.status, headers=headers)
        return StreamingResponse(_relay(stream, head.body, headers.get("content-type", ""),
                                        metrics), status_code=head.status, headers=headers)

    return app


async def _assigned(respond: DeploymentHandle, request: ProxiedRequest, timeout_s: float
                    ) -> DeploymentResponseGenerator:
    """`request` sent to the replica Ray's router picks, once a replica has accepted it (within
    `timeout_s`)."""
    # A plain call: the replica accepts or rejects it in its first message (Ray's rejection
    # protocol); choose_replica + dispatch cost a reserve_slot RPC more.
    stream = respond.remote(request)
    assert isinstance(stream, DeploymentResponseGenerator), "respond is a streaming call"
    try:  # private, as no public call waits for the assignment alone
        await asyncio.wait_for(stream._fetch_future_result_async(), timeout_s)
    except asyncio.TimeoutError:
        stream.cancel()
        raise _Unplaced(f"none became free within {timeout_s:g} s") from None
    except BaseException:
        stream.cancel()
        raise
    return stream


async def _head(stream: DeploymentResponseGenerator) -> ResponseHead:
    """The response's head, the replica's first item (the call is cancelled if it fails)."""
    try:
        head = await stream.__anext__()
    except BaseException:
        stream.cancel()
        raise
    assert isinstance(head, ResponseHead), "a replica's first item is its response head"
    return head


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


async def _relay(stream: DeploymentResponseGenerator, first: bytes, content_type: str,
                 metrics: IngressMetrics) -> AsyncIterator[bytes]:
    """The replica's body chunks (`first`, what came with the head, then the rest); if it
    dies mid-way, `_error_tail`. Leaving early (the client went away) cancels the call, so
    the replica aborts the request."""
    try:
        if first:
            yield first
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
