"""One Levante engine as a Ray Serve replica: the whole server app, called in-process per request.

The ingress (`levante.distributed.ray_ingress`) hands each HTTP request over as a
`ProxiedRequest`; `EngineReplica.respond` runs it through the same FastAPI app `levante serve`
builds (`create_app`: OpenAI, Responses, Ollama routes, guards, errors), as an ASGI call with
no socket, and yields what the app sends, one item per batch of messages it sent at once: a
`ResponseHead` carrying the body sent with it (a whole non-streamed body: the only item, as
each item is one more message on the wire), then the body's chunks as they come (one SSE
event or NDJSON line each when streaming, unless several were ready at once). The
generator's end (done, client gone, cancelled by the ingress) is the app's `http.disconnect`,
so the engine aborts the request.

Ray calls `check_health` every health-check period: it fails once the engine thread has died
(or a rank has), and Ray replaces the replica. With `tensor_parallel` > 1 the replica is rank
0 of N: the others are Ray actors in its placement group (levante.distributed.ray_ranks),
on its node or others; gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from levante.distributed.replicas import conversation_key, json_object
from levante.server.config import ServerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProxiedRequest:
    """An HTTP request as the ingress forwards it to a replica, with what routers read.

    `routing_key` is for `ConversationAffinityRouter`; `messages` and `prompt` are the
    attributes Ray's `PrefixCacheAffinityRouter` looks for (None when absent: Ray's router
    then takes the request as text-less).
    """

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    routing_key: bytes | None = None
    messages: list[Any] | None = field(default=None, repr=False)
    prompt: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, method: str, path: str, query_string: bytes,
           headers: tuple[tuple[bytes, bytes], ...], body: bytes) -> ProxiedRequest:
        """The request with its routing fields read from a JSON body (the built-in front's
        `conversation_key`: a chat's first two messages, or a prompt's start)."""
        data = json_object(body)
        messages = data.get("messages")
        prompt = data.get("prompt")
        return cls(method, path, query_string, headers, body, conversation_key(data),
                   messages if isinstance(messages, list)
                   and all(isinstance(m, dict) for m in messages) else None,
                   prompt if isinstance(prompt, str) else None)


@dataclass(frozen=True)
class ResponseHead:
    """The status and headers a replica's app answered with, which replica it was, and the
    body as far as the app had sent it with them (all of it when `is_complete`)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    replica: str
    body: bytes = b""
    is_complete: bool = False


class EngineReplica:
    """A Ray Serve deployment body: one `ServerState` and the app over it (see module doc)."""

    def __init__(self, config: ServerConfig, tensor_parallel: int = 1,
                 rank_resources: tuple[float, float] | None = None) -> None:
        """`rank_resources` (CPUs, GPUs): start ranks 1..N-1 as Ray actors with those in this
        replica's placement group (levante.distributed.ray_ranks), else spawn them here."""
        from levante.server.app import create_app
        from levante.server.routes import ServerState

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.group: Any = None
        if tensor_parallel > 1:
            from levante.distributed.launch import TensorParallelGroup, server_state

            self.group = TensorParallelGroup.start(
                config.ref, tensor_parallel=tensor_parallel, load_config=config.load_config,
                **_ray_rank_options(rank_resources))
            self.state = server_state(self.group, config)
        else:
            self.state = ServerState.build(config)
        self.app = create_app(config, self.state)
        self.state.engine.start()  # the app's lifespan is not run: no socket, no server
        self.name = _replica_name()

    async def respond(self, request: ProxiedRequest) -> AsyncIterator[ResponseHead | bytes]:
        """Run `request` through the app: its `ResponseHead`, then its body chunks."""
        sent: asyncio.Queue[MutableMapping[str, Any] | None] = asyncio.Queue()
        gone = asyncio.Event()
        is_body_read = False

        async def receive() -> dict[str, Any]:
            nonlocal is_body_read
            if not is_body_read:
                is_body_read = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()  # what a streaming response listens for while it streams
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            await sent.put(message)

        call = asyncio.ensure_future(self.app(_scope(request), receive, send))
        call.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            is_done = False
            while not is_done:  # one item per batch of messages the app sent at once
                messages = [await sent.get()]
                while not sent.empty():
                    messages.append(sent.get_nowait())
                start, body, is_done = _read_messages(messages)
                if start is not None:
                    yield ResponseHead(start["status"], tuple(
                        (bytes(k), bytes(v)) for k, v in start.get("headers", ())), self.name,
                        body, is_done)
                elif body:
                    yield body
            await call  # re-raises what the app raised after its last message
        finally:
            gone.set()
            if not call.done():
                await asyncio.wait({call}, timeout=5.0)
                call.cancel()

    def check_health(self) -> None:
        """Ray's health check: raise once the engine (or a tensor-parallel rank) has died."""
        engine = self.state.engine
        if not engine.is_healthy:
            raise RuntimeError(f"the engine has stopped: {engine.death}")
        if self.group is not None:
            for rank, worker in enumerate(self.group.workers, start=1):
                if not worker.is_alive():
                    raise RuntimeError(f"tensor-parallel rank {rank} exited ({worker.exitcode})")

    def __del__(self) -> None:  # Ray Serve calls it when it stops the replica
        state = getattr(self, "state", None)
        if state is not None:
            state.engine.stop()
        if getattr(self, "group", None) is not None:
            self.group.shutdown()


def _ray_rank_options(rank_resources: tuple[float, float] | None) -> dict[str, Any]:
    """`TensorParallelGroup.start`'s rank starter and rendezvous host for Ray actor ranks."""
    if rank_resources is None:
        return {}
    import functools

    import ray

    from levante.distributed.ray_ranks import start_ray_ranks

    num_cpus, num_gpus = rank_resources
    return {"start_ranks": functools.partial(start_ray_ranks, num_cpus=num_cpus,
                                             num_gpus=num_gpus),
            "host": ray.util.get_node_ip_address()}


def _read_messages(messages: list[MutableMapping[str, Any] | None]
                   ) -> tuple[MutableMapping[str, Any] | None, bytes, bool]:
    """The response start among an app's ASGI `messages` (if there), their body bytes, and
    whether the response ended (its last body message, or None: the app returned)."""
    start: MutableMapping[str, Any] | None = None
    chunks: list[bytes] = []
    for message in messages:
        if message is None:
            return start, b"".join(chunks), True
        if message["type"] == "http.response.start":
            start = message
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                return start, b"".join(chunks), True
    return start, b"".join(chunks), False


def _scope(request: ProxiedRequest) -> dict[str, Any]:
    """The ASGI scope of `request`, as uvicorn would build it on a loopback socket."""
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": request.method, "scheme": "http",
            "path": request.path, "raw_path": request.path.encode(), "root_path": "",
            "query_string": request.query_string, "headers": list(request.headers),
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {}}


def _replica_name() -> str:
    """This replica's id in Ray Serve (its pid outside one)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except RayServeException:
        return f"pid{os.getpid()}"
