"""`levante serve --ray`: Levante engines as Ray Serve replicas, and the HTTP front over them.

- `LevanteEngine` (`EngineReplica`, levante.distributed.ray_replica): N engines, each running the
  whole `levante serve` app in-process; Ray scales them between min and max replicas on
  ongoing requests, health-checks them, and routes each call with `ConversationAffinityRouter`
  (levante.distributed.ray_router) or Ray's own prefix-tree router.
- The ingress app (levante.distributed.ray_ingress): guards, retries, relayed streams, 503s
  and /metrics in front of a handle to the engines. `levante serve --ray` serves it from its
  own process (one Ray hop a request); under `serve run`, or with `--ray-proxy`, it is the
  `LevanteIngress` deployment (`Ingress`) behind Ray Serve's HTTP proxy, as Ray Serve LLM is
  built (three hops: proxy to ingress, ingress back to the proxy for the body, to an engine).

On a Ray cluster (`ray start --head` / `ray start --address`; RAY_ADDRESS set), `levante serve
--ray` deploys there; otherwise it starts a local one. `serve run` takes `app_builder`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from dataclasses import dataclass, fields
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from levante.distributed.ray_ingress import ingress_app
from levante.distributed.ray_replica import EngineReplica
from levante.errors import ConfigError
from levante.server.config import ServerConfig

log = logging.getLogger(__name__)
APP_NAME = "levante"
ENGINE_DEPLOYMENT = "LevanteEngine"
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


@serve.ingress()
class Ingress:
    """The ingress deployment body: holds the engines' handle; its app is `ingress_app`."""

    def __init__(self, engines: DeploymentHandle, config: ServerConfig,
                 ray_config: RayServeConfig) -> None:
        self.engines, self.config, self.ray_config = engines, config, ray_config

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ingress_app(self.engines, self.config,
                           placement_timeout_s=self.ray_config.placement_timeout_s,
                           max_queued_requests=self.ray_config.max_queued_requests)


def build_app(config: ServerConfig, ray_config: RayServeConfig) -> Any:
    """The Ray Serve application behind Ray's proxy: the ingress bound to the engines."""
    ingress = serve.deployment(name="LevanteIngress")(Ingress).options(
        num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.max_connections)
    return ingress.bind(build_engines(config, ray_config), config, ray_config)


def build_engines(config: ServerConfig, ray_config: RayServeConfig) -> Any:
    """The engine deployment, bound: `build_app`'s, or an application of its own (no HTTP
    route) when `serve_ray` serves HTTP from its own process."""
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
        # The ingress logs each request; a replica's own access line (sent on to the driver's
        # console as well) cost ~1 ms of CPU a request here.
        logging_config={"enable_access_log": False},
        request_router_config=RequestRouterConfig(  # a class or its import path
            request_router_class=ROUTERS[ray_config.router]))  # type: ignore[arg-type]
    rank_resources = (ray_config.num_cpus, ray_config.num_gpus) if tp > 1 else None
    return engines.bind(config, tp, rank_resources)


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


def serve_ray(config: ServerConfig, ray_config: RayServeConfig, *,
              through_ray_proxy: bool = False) -> None:
    """Deploy on the Ray cluster at RAY_ADDRESS (else a local one) and serve on
    config.host:port until SIGTERM/SIGINT, then remove the app (and stop a local Ray).

    HTTP is served from this process by default: `ingress_app` over a handle to the engines,
    so a request crosses one Ray hop (here to an engine replica, over gRPC). With
    `through_ray_proxy`, Ray Serve's proxy (on every node with a replica) and the ingress
    deployment serve it instead, as under `serve run`: two more hops (proxy to ingress, and
    the ingress reading the body back from the proxy).
    """
    import ray

    from levante.server.app import check_port_free

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_port_free(config.host, config.port)
    is_local = not os.environ.get("RAY_ADDRESS")
    ray.init(include_dashboard=False, num_cpus=os.cpu_count() if is_local else None)
    try:
        if through_ray_proxy:
            _serve_through_ray_proxy(config, ray_config)
        else:
            _serve_here(config, ray_config)
    finally:
        # Bounded: a terminal's Ctrl-C or systemd's stop reaches Ray's own processes too, and
        # Serve's calls then wait forever for a controller that is gone.
        cleanup = threading.Thread(target=serve.shutdown if is_local else serve.delete,
                                   args=() if is_local else (APP_NAME,), daemon=True)
        cleanup.start()
        cleanup.join(config.drain_timeout + 10)
        if is_local:
            ray.shutdown()


def _serve_here(config: ServerConfig, ray_config: RayServeConfig) -> None:
    """The engines as an application with no HTTP route and no Ray proxy; `ingress_app`
    over a handle to them on `front_server`, until SIGTERM/SIGINT."""
    from levante.distributed.replicas import raise_system_exit

    serve.start(proxy_location="Disabled")
    serve.run(build_engines(config, ray_config), name=APP_NAME, route_prefix=None)
    engines = serve.get_deployment_handle(ENGINE_DEPLOYMENT, APP_NAME)
    server = front_server(ingress_app(engines, config,
                                      placement_timeout_s=ray_config.placement_timeout_s,
                                      max_queued_requests=ray_config.max_queued_requests),
                          config)
    _log_serving(config, ray_config, "this process")
    # uvicorn re-raises SIGTERM to the previous handler once it has drained: an exception,
    # so that serve_ray's cleanup runs.
    signal.signal(signal.SIGTERM, raise_system_exit)
    server.run()


def front_server(app: FastAPI, config: ServerConfig) -> Any:
    """uvicorn serving `app` on config.host:port with `levante serve`'s read deadlines and
    connection bound; requests in flight get config.drain_timeout to finish on a stop."""
    import uvicorn

    from levante.server.listener import listener_config

    return uvicorn.Server(listener_config(
        app, config, timeout_graceful_shutdown=math.ceil(config.drain_timeout)))


def _serve_through_ray_proxy(config: ServerConfig, ray_config: RayServeConfig) -> None:
    """`build_app` behind Ray Serve's proxy on config.host:port, until SIGTERM/SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config, ray_config), name=APP_NAME, route_prefix="/")
    _log_serving(config, ray_config, "Ray Serve's proxy")
    stop.wait()


def _log_serving(config: ServerConfig, ray_config: RayServeConfig, front: str) -> None:
    log.info("Ray Serve: %s on http://%s:%d from %s (replicas %d-%d, tensor parallel %d)",
             config.ref, config.host, config.port, front, ray_config.min_replicas,
             ray_config.max_replicas, ray_config.tensor_parallel)
