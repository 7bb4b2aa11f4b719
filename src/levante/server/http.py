"""The HTTP boundary's two ends: strict JSON bodies in, OpenAI-shaped errors out (in one place)."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from levante.errors import ContextLengthError, LevanteError, RequestError
from levante.server.protocol import error_body

log = logging.getLogger(__name__)


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
