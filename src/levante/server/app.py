"""The FastAPI app: config, OpenAI-shaped errors, body parsing, serve(); guards: server.guards."""

from __future__ import annotations

import json
import logging
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from levante.errors import ConfigError, ContextLengthError, LevanteError, RequestError
from levante.load_config import LoadConfig
from levante.server.hosts import is_loopback_bind, split_host
from levante.server.protocol import error_body

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ServerConfig:
    """How `levante serve` runs: the model, the engine limits and the HTTP guards."""

    ref: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)  # never in a logged repr
    max_model_len: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_queue: int = 256
    kv_cache_memory: int | None = None
    num_kv_blocks: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    quant: str = "auto"
    kv_cache_dtype: str = "auto"
    served_model_name: str | None = None
    enable_prefix_caching: bool = True
    lora: tuple[tuple[str, str], ...] = ()  # (served name, adapter folder)
    num_speculative_tokens: int = 0
    batch_invariant: bool = False
    max_body_bytes: int = 8 * 2**20
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback ones
    no_web: bool = False
    drain_timeout: float = 30.0  # seconds accepted requests get to finish after SIGTERM
    header_timeout: float = 10.0  # seconds a request's headers may take to arrive
    body_timeout: float = 60.0  # seconds its body may take after the headers
    max_connections: int = 1024  # open connections; past it a request gets a 503
    allow_local_paths: bool = False  # /api/pull may name files on the server's disk
    # Responses API responses kept in memory for previous_response_id (least recent go first)
    max_stored_responses: int = 1024
    max_stored_response_bytes: int = 64 * 2**20
    # mean | cls | last; None: the GGUF's `<arch>.pooling_type`, else mean (see embeddings)
    embedding_pooling: str | None = None
    # How the model loads, built from the fields above (and checked) when the config is made.
    load_config: LoadConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "load_config", LoadConfig(
            device=self.device, dtype=self.dtype, quant=self.quant,
            kv_cache_dtype=self.kv_cache_dtype, max_model_len=self.max_model_len,
            kv_cache_memory=self.kv_cache_memory))
        names = []
        for given in self.allowed_hosts:
            split = split_host(given)
            if split is None or split[1] is not None:
                raise ConfigError(f"allowed_hosts: {given!r} is not a host name or IP "
                                  "(give names without a port, e.g. myhost.example)")
            names.append(split[0])
        object.__setattr__(self, "allowed_hosts", tuple(names))
        if self.embedding_pooling not in (None, "mean", "cls", "last"):
            raise ConfigError(f"embedding_pooling must be mean, cls or last, got "
                              f"{self.embedding_pooling!r}")
        for name in ("drain_timeout", "header_timeout", "body_timeout", "max_connections"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_stored_responses", "max_stored_response_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: store none), got "
                                  f"{getattr(self, name)}")


class HTTPError(Exception):
    """An error with an HTTP status, rendered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type_: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_=type_, param=param, code=code)
        self.headers = headers


def generation_error(message: str, code: str | None) -> Exception:
    """The exception for a request the engine ended with an error: a 503 to retry when the
    server is shutting down (code "server_shutdown"), else a 500."""
    if code == "server_shutdown":
        return RequestError(message, code=code)
    return HTTPError(500, message, type_="server_error")


def error_response(exc: Exception) -> JSONResponse:
    """Map our exceptions to OpenAI-shaped JSON errors with the right status (one place)."""
    if isinstance(exc, HTTPError):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)
    if isinstance(exc, StarletteHTTPException):  # routing: 404 no such path, 405 method
        codes = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(error_body(str(exc.detail), type_="invalid_request_error",
                                       code=codes.get(exc.status_code)),
                            status_code=exc.status_code, headers=exc.headers)
    if isinstance(exc, RequestError) and exc.code == "queue_full":
        return JSONResponse(error_body(str(exc), type_="server_overloaded", code=exc.code),
                            status_code=503, headers={"Retry-After": "1"})
    if isinstance(exc, RequestError) and exc.code == "engine_dead":
        return JSONResponse(error_body(str(exc), type_="server_error", code=exc.code),
                            status_code=503)
    if isinstance(exc, RequestError) and exc.code == "server_shutdown":
        return JSONResponse(error_body(str(exc), type_="server_error", code=exc.code),
                            status_code=503, headers={"Retry-After": "1"})
    if isinstance(exc, (RequestError, ContextLengthError)):
        return JSONResponse(error_body(str(exc), type_="invalid_request_error",
                                       param=exc.param, code=exc.code), status_code=400)
    if isinstance(exc, (RequestValidationError, ValidationError)):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(message, type_="invalid_request_error", param=param),
                            status_code=400)
    if isinstance(exc, LevanteError):
        return JSONResponse(error_body(str(exc), type_="invalid_request_error"),
                            status_code=400)
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal server error", type_="server_error"),
                        status_code=500)


async def parse_body(request: Request, model: type[BaseModel], limit: int) -> Any:
    """Read and validate a JSON object body; 400 for bad JSON, 413 when too large."""
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body has no Content-Length to check
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body is over {limit} bytes (the limit)",
                            type_="invalid_request_error", code="request_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        data = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # ValueError covers JSON and UTF-8 errors
        raise HTTPError(400, f"body is not valid JSON: {e}",
                        type_="invalid_request_error") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "body must be a JSON object", type_="invalid_request_error")
    if b"\\ud" in body or b"\\uD" in body:  # a \uD800-\uDFFF escape: is it paired?
        _reject_lone_surrogates(data)
    return model.model_validate(data)


def _reject_lone_surrogates(data: Any) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which is no character: every
    tokenizer and encoder after this would fail on it (500s): a 400 instead."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPError(400, "the body holds a lone UTF-16 surrogate (\\ud800-\\udfff escape "
                        "without its pair): not a character", type_="invalid_request_error"
                        ) from None


def _reject_constant(name: str) -> Any:
    """`NaN`, `Infinity`, `-Infinity`: Python's json accepts them, JSON (RFC 8259) does not."""
    raise ValueError(f"{name} is not a JSON value (numbers must be finite)")


def _finite_float(text: str) -> float:
    """A JSON number that overflows a double (`1e400`) would otherwise read as infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range (numbers must be finite)")
    return value


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
