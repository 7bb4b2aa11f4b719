"""The browser chat page at `/`: static files shipped in the package (no build step, no CDN)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from levante.server.config import ServerConfig
from levante.server.routes import ServerState

# URL path -> (file in levante/web, media type). guards.PUBLIC_PATHS lists these paths too.
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Only our own files run, style and fetch; nothing may frame the page.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def register_web(app: FastAPI, config: ServerConfig, state: ServerState) -> None:
    """Serve the chat page and its assets, unless `config.no_web`; the page calls /v1 itself."""
    del state  # the page learns everything through the API
    if config.no_web:
        return
    folder = files("levante") / "web"
    for path, (name, media_type) in ASSETS.items():
        app.add_api_route(path, _static(folder.joinpath(name).read_bytes(), media_type,
                                        page=path == "/"),
                          methods=["GET"], include_in_schema=False)


# What Ollama answers at GET /; its clients (and scripts waiting for the server) read it.
OLLAMA_ROOT_TEXT = "Ollama is running"


def _static(content: bytes, media_type: str, *, page: bool = False
            ) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint answering with one file read at startup; the page only to browsers
    (Accept: text/html), Ollama's greeting to every other client."""
    async def endpoint(request: Request) -> Response:
        if page and "text/html" not in request.headers.get("accept", ""):
            return PlainTextResponse(OLLAMA_ROOT_TEXT)
        return Response(content, media_type=media_type, headers=HEADERS)

    return endpoint
