"""The FastAPI app: middleware, routes, error handlers, /openapi.json's bodies; serve()."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from levante.errors import ConfigError, LevanteError
from levante.server.config import ServerConfig
from levante.server.hosts import is_loopback_bind
from levante.server.http import HTTPError, error_response

log = logging.getLogger(__name__)


def create_app(config: ServerConfig, state: Any) -> FastAPI:
    """The app over a ready `ServerState` (see server.routes)."""
    from levante.server.guards import (
        GuardMiddleware,
        RequestIdMiddleware,
        UnexpectedErrorMiddleware,
    )
    from levante.server.ollama import register_ollama
    from levante.server.responses_api import register_responses
    from levante.server.routes import register
    from levante.server.web import register_web

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        state.engine.start()
        yield
        state.engine.stop()

    app = FastAPI(title="Levante", version="0.1.0", lifespan=lifespan)
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(GuardMiddleware, config=config)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["x-request-id"])
    app.add_middleware(RequestIdMiddleware)  # outermost: refusals carry one too
    for exc_type in (HTTPError, LevanteError, RequestValidationError, ValidationError,
                     StarletteHTTPException):
        app.add_exception_handler(exc_type, _shaped_error)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    register(app, config, state)
    register_responses(app, config, state)
    register_ollama(app, config, state)
    register_web(app, config, state)
    _document_request_bodies(app)
    return app


def _shaped_error(request: Request, exc: Exception) -> JSONResponse:
    """An error raised outside a route's own handling (routing, validation): in Ollama's
    shape under /api/, else OpenAI's."""
    if request.url.path.startswith("/api/"):
        from levante.server.ollama import ollama_error

        return ollama_error(exc)
    return error_response(exc)


def _document_request_bodies(app: FastAPI) -> None:
    """Put the request-body models into /openapi.json: the routes read bodies through
    `parse_body` (to answer bad JSON and sizes in OpenAI's shape), so FastAPI cannot see them."""
    from levante.server.ollama_protocol import (
        ChatBody,
        CopyBody,
        CreateBody,
        EmbedBody,
        EmbeddingsBody,
        GenerateBody,
        NamedBody,
    )
    from levante.server.protocol import (
        ChatCompletionRequest,
        CompletionRequest,
        DetokenizeRequest,
        EmbeddingRequest,
        TokenizeRequest,
    )
    from levante.server.responses_protocol import ResponsesRequest

    bodies: dict[str, type[BaseModel]] = {
        "/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
        "/v1/responses": ResponsesRequest,
        "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest,
        "/v1/embeddings": EmbeddingRequest, "/api/embed": EmbedBody,
        "/api/embeddings": EmbeddingsBody, "/api/chat": ChatBody, "/api/generate": GenerateBody,
        "/api/show": NamedBody, "/api/pull": NamedBody, "/api/create": CreateBody,
        "/api/copy": CopyBody, "/api/delete": NamedBody}
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for path, model in bodies.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            for operation in document["paths"][path].values():  # POST, or DELETE
                operation["requestBody"] = {
                    "required": True, "content": {"application/json": {"schema": ref}}}
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def check_port_free(host: str, port: int) -> None:
    """ConfigError now if HOST:PORT cannot be bound (in use, or not an address of this
    machine), not after the model has loaded."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror or e} (is another "
                              f"server running there? choose another --port)") from None


def serve(config: ServerConfig) -> None:
    """Load the model, build the app and run uvicorn until SIGTERM/SIGINT (drains first)."""
    from levante.server.listener import build_server
    from levante.server.routes import ServerState

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not is_loopback_bind(config.host) and not config.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach it can use it",
                    config.host)
    check_port_free(config.host, config.port)  # before a load that may take minutes
    state = ServerState.build(config)
    app = create_app(config, state)
    server = build_server(app, config, state.engine)
    # A dead engine thread has already ended its requests with errors; the process exits
    # non-zero so that a supervisor (systemd, Kubernetes, `restart: always`) restarts it.
    state.engine.on_death = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.engine.death is not None:
        log.error("exiting: the engine stopped (%s)", state.engine.death)
        raise SystemExit(1)
