"""Ollama's API on the same engine: chat and generate (NDJSON), embed, tags, show, ps, pull, and
names made by create and copy (see ollama_aliases)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from levante.chat.fim import fim_prompt_ids
from levante.chat.request import check_prompt_size
from levante.chat.tool_calls import parse_tool_calls
from levante.engine.async_engine import RequestStream
from levante.engine.engine import StepOutput
from levante.errors import LevanteError, RequestError
from levante.kinds import FinishReason
from levante.server import ollama_aliases as aliases
from levante.server.config import ServerConfig
from levante.server.embeddings import ollama_embed, ollama_embeddings
from levante.server.http import HTTPError, error_response, generation_error, parse_body
from levante.server.ollama_model import ModelFacts, file_size
from levante.server.ollama_protocol import (
    ChatBody,
    CopyBody,
    CreateBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    NamedBody,
    Options,
)
from levante.server.routes import ServerState
from levante.server.web import OLLAMA_ROOT_TEXT
from levante.weights import hub

OLLAMA_VERSION = "0.12.0"  # the Ollama release whose API shapes these routes follow
NDJSON = "application/x-ndjson"


def register_ollama(app: FastAPI, config: ServerConfig, state: ServerState) -> None:
    """Add Ollama's routes to `app` (and `GET /` as Ollama answers it when the web page is off)."""
    limit = config.max_body_bytes
    facts = ModelFacts.read(state)

    @app.head("/")
    async def head_root() -> Response:
        return Response(status_code=200)

    if config.no_web:
        @app.get("/")
        async def root() -> Response:
            return PlainTextResponse(OLLAMA_ROOT_TEXT)

    @app.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_VERSION}

    @app.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [facts.listing(), *map(facts.listing, state.aliases.values())]}

    @app.get("/api/ps")
    async def ps() -> dict[str, Any]:
        return {"models": [facts.running()]}

    @app.post("/api/show")
    async def show(request: Request) -> Response:
        async def run() -> Response:
            body: NamedBody = await parse_body(request, NamedBody, limit)
            return JSONResponse(facts.show(aliases.lookup(state, body.ref)))
        return await _answer("ollama_show", state, run)

    @app.post("/api/embed")
    async def embed(request: Request) -> Response:
        async def run() -> Response:
            body: EmbedBody = await parse_body(request, EmbedBody, limit)
            options = aliases.lookup(state, body.model).options_for(body.options)
            return JSONResponse(await ollama_embed(state, body, options))
        return await _answer("ollama_embed", state, run)

    @app.post("/api/embeddings")
    async def embeddings(request: Request) -> Response:
        async def run() -> Response:
            body: EmbeddingsBody = await parse_body(request, EmbeddingsBody, limit)
            options = aliases.lookup(state, body.model).options_for(body.options)
            body = body.model_copy(update={"options": options})
            return JSONResponse(await ollama_embeddings(state, body))
        return await _answer("ollama_embeddings", state, run)

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        return await _answer("ollama_chat", state,
                             lambda: _generate(request, state, ChatBody, limit))

    @app.post("/api/generate")
    async def generate(request: Request) -> Response:
        return await _answer("ollama_generate", state,
                             lambda: _generate(request, state, GenerateBody, limit))

    @app.post("/api/pull")
    async def pull(request: Request) -> Response:
        async def run() -> Response:
            body: NamedBody = await parse_body(request, NamedBody, limit)
            ref = body.ref.removesuffix(":latest")
            allow_local = config.allow_local_paths
            # A refused ref is a 400 before any stream starts, streaming or not.
            await asyncio.to_thread(hub.check_pull_ref, ref, allow_local=allow_local)
            if body.stream:
                return StreamingResponse(_pull_lines(ref, allow_local), media_type=NDJSON)
            await asyncio.to_thread(hub.pull, ref, progress=False, allow_local=allow_local)
            return JSONResponse({"status": "success"})
        return await _answer("ollama_pull", state, run)

    register_names(app, state, limit)


def register_names(app: FastAPI, state: ServerState, limit: int) -> None:
    """/api/create, /api/copy and /api/delete: names for the served model (ollama_aliases)."""

    @app.post("/api/create")
    async def create(request: Request) -> Response:
        async def run() -> Response:
            body: CreateBody = await parse_body(request, CreateBody, limit)
            alias = aliases.create(state, body)
            if not body.stream:
                return JSONResponse({"status": "success"})
            lines = [{"status": f"using {alias.name} as another name for the served model"},
                     {"status": "writing manifest"}, {"status": "success"}]
            return Response("".join(json.dumps(line) + "\n" for line in lines),
                            media_type=NDJSON)
        return await _answer("ollama_create", state, run)

    @app.post("/api/copy")
    async def copy(request: Request) -> Response:
        async def run() -> Response:
            aliases.copy(state, await parse_body(request, CopyBody, limit))
            return Response(status_code=200)
        return await _answer("ollama_copy", state, run)

    @app.delete("/api/delete")
    async def delete(request: Request) -> Response:
        async def run() -> Response:
            body: NamedBody = await parse_body(request, NamedBody, limit)
            aliases.delete(state, body.ref)
            return Response(status_code=200)
        return await _answer("ollama_delete", state, run)


def ollama_error(exc: Exception) -> JSONResponse:
    """Any error as Ollama writes it, `{"error": "..."}`, with the status app.py maps it to."""
    response = error_response(exc)
    message = json.loads(bytes(response.body))["error"]["message"]
    headers = {k: v for k, v in response.headers.items() if k.lower() in ("retry-after", "allow")}
    return JSONResponse({"error": message}, status_code=response.status_code, headers=headers)


async def _answer(endpoint: str, state: ServerState,
                  handler: Callable[[], Awaitable[Response]]) -> Response:
    """Run a handler; every error leaves in Ollama's shape; count the request."""
    try:
        response = await handler()
    except Exception as exc:  # noqa: BLE001 - rendered (and logged if unexpected) by ollama_error
        response = ollama_error(exc)
    state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    return response


def _now() -> str:
    """RFC 3339 in UTC, as Ollama's `created_at`: "2024-05-01T12:00:00.123456Z"."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


async def _generate(request: Request, state: ServerState,
                    kind: type[ChatBody | GenerateBody], limit: int) -> Response:
    """/api/chat or /api/generate: validate, encode, submit, then stream or collect."""
    started_ns = time.perf_counter_ns()
    body: ChatBody | GenerateBody = await parse_body(request, kind, limit)
    body.check_supported()  # before the name's defaults join it: errors name what was sent
    body = aliases.lookup(state, body.model).apply(body)
    is_chat = isinstance(body, ChatBody)
    if not (body.messages if isinstance(body, ChatBody) else body.prompt):
        # Ollama's answer to an empty request: the model is loaded (it always is here).
        return JSONResponse({**_envelope(is_chat, body.model, ""), "done": True,
                             "done_reason": "load"})
    grammar, tool_style = None, None
    if isinstance(body, ChatBody) and state.bundle.chat_format is not None:
        prepared = await asyncio.to_thread(
            state.chats.prepare, body.chat_messages(), tools=body.tools,
            response_format=body.response_format())
        prompt_ids, grammar, tool_style = (prepared.prompt_ids, prepared.grammar,
                                           prepared.tool_style)
    else:
        prompt_ids = await asyncio.to_thread(_encode, state, body)
        if body.response_format() is not None:
            grammar = await asyncio.to_thread(
                state.chats.compiler.compile, response_format=body.response_format(),
                chat_style=state.chats.style)
    params = (body.options or Options()).sampling_params(
        num_prompt_tokens=len(prompt_ids), context=state.bundle.config.max_seq_len,
        logprobs=body.num_logprobs())
    state.check_admissible([prompt_ids], params, num_new=1)
    stream = await state.engine.add_request(prompt_ids, params, f"ollama-{uuid.uuid4().hex}",
                                            grammar=grammar)
    state.metrics.prompt_tokens.inc(len(prompt_ids))
    run = _Run(state, stream, prompt_ids, body.model, is_chat=is_chat, started_ns=started_ns,
               tool_style=tool_style, stop=params.stop)
    if body.stream:
        return StreamingResponse(run.lines(), media_type=NDJSON)
    return JSONResponse(await run.collect(request))


def _encode(state: ServerState, body: ChatBody | GenerateBody) -> list[int]:
    """Prompt ids: chat messages through the model's chat format; a generate prompt as one user
    turn (or as-is with `raw`, or where the model has no template), after any `context`."""
    chat_format = state.bundle.chat_format
    tokenizer = state.bundle.tokenizer
    if isinstance(body, ChatBody):
        if chat_format is None:
            raise RequestError("this model has no chat template; use /api/generate",
                               param="messages")
        return chat_format.encode(body.chat_messages())
    check_prompt_size(state.bundle, len(body.prompt) + len(body.system or "")
                      + len(body.suffix or ""), param="prompt")
    if body.suffix:  # check_supported refused raw, system and context with it
        return fim_prompt_ids(tokenizer, body.prompt, body.suffix, model=body.model)
    if body.raw or chat_format is None:
        if body.system:
            raise RequestError("this model has no chat template to put system in",
                               param="system")
        ids = tokenizer.encode(body.prompt, add_bos=tokenizer.should_add_bos and not body.context)
    else:
        system = [{"role": "system", "content": body.system}] if body.system else []
        ids = chat_format.encode([*system, {"role": "user", "content": body.prompt}])
    return [*(body.context or []), *ids]


def _envelope(is_chat: bool, model: str, text: str) -> dict[str, Any]:
    """The fields every chat or generate object starts with."""
    if is_chat:
        return {"model": model, "created_at": _now(),
                "message": {"role": "assistant", "content": text}}
    return {"model": model, "created_at": _now(), "response": text}


@dataclass
class _Run:
    """One Ollama generation on the engine: its output so far and its timings (ns)."""

    state: ServerState
    stream: RequestStream
    prompt_ids: list[int]
    model: str
    is_chat: bool
    started_ns: int
    tool_style: str | None = None  # replies may hold tool calls: parsed at the end
    stop: tuple[str, ...] = ()  # the request's stop strings, which cut the content
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    first_ns: int | None = None
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    done_reason: str | None = None

    def update(self, out: StepOutput) -> list[dict[str, Any]]:
        """Take one engine output; return its logprob entries (Ollama's shape)."""
        if out.error:
            raise generation_error(out.error, out.error_code)
        if self.first_ns is None and out.new_token_ids:
            self.first_ns = time.perf_counter_ns()
            self.state.metrics.ttft.observe((self.first_ns - self.started_ns) / 1e9)
        self.state.metrics.generation_tokens.inc(len(out.new_token_ids))
        self.text += out.new_text
        self.output_ids.extend(out.new_token_ids)
        self.done_reason = out.finish_reason if out.finished else None
        entries = [self._logprob(t, lp, top) for t, lp, top
                   in zip(out.new_token_ids, out.logprobs, out.top_logprobs) if lp is not None]
        self.logprobs.extend(entries)
        return entries

    def _logprob(self, token: int, logprob: float,
                 top: list[tuple[int, float]] | None) -> dict[str, Any]:
        text = self.state.bundle.tokenizer.token_text
        return {"token": text(token), "logprob": logprob,
                "top_logprobs": [{"token": text(i), "logprob": v} for i, v in (top or [])]}

    def final(self, text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
        """The closing object: `done`, `done_reason` and Ollama's counts and durations."""
        end = time.perf_counter_ns()
        first = self.first_ns or end
        body = {**_envelope(self.is_chat, self.model, text), "done": True,
                "done_reason": self.done_reason or FinishReason.STOP}
        if self.tool_style is not None:
            content, calls = parse_tool_calls(self.output_ids, self.state.bundle.tokenizer,
                                              style=self.tool_style, stop=self.stop)
            if calls:  # Ollama's shape: arguments as an object, no ids
                body["message"] = {"role": "assistant", "content": content or "",
                                   "tool_calls": [{"function": {
                                       "name": c.name, "arguments": json.loads(c.arguments)}}
                                       for c in calls]}
        if logprobs:
            body["logprobs"] = logprobs
        if not self.is_chat:
            body["context"] = [*self.prompt_ids, *self.output_ids]
        return {**body, "total_duration": end - self.started_ns,
                "load_duration": 0,  # the model is loaded when the server starts
                "prompt_eval_count": len(self.prompt_ids),
                "prompt_eval_duration": first - self.submitted_ns,
                "eval_count": len(self.output_ids), "eval_duration": end - first}

    async def lines(self) -> AsyncIterator[str]:
        """NDJSON: one object per engine step with new text, then the closing object; an
        error mid-stream is one `{"error": ...}` line (the status is already sent)."""
        try:
            async for out in self.stream:
                try:
                    entries = self.update(out)
                except HTTPError as exc:
                    yield json.dumps({"error": str(exc)}) + "\n"
                    return
                if out.new_text or entries:
                    chunk = {**_envelope(self.is_chat, self.model, out.new_text), "done": False}
                    yield json.dumps({**chunk, **({"logprobs": entries} if entries else {})}) + "\n"
            yield json.dumps(self.final("", [])) + "\n"
        finally:
            self.stream.abort()  # a client that leaves early frees its KV blocks

    async def collect(self, request: Request) -> dict[str, Any]:
        """Run to the end (aborting if the client goes away) and build the one object."""
        async def drain() -> None:
            async for out in self.stream:
                self.update(out)

        task = asyncio.create_task(drain())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if not done and await request.is_disconnected():
                    raise HTTPError(499, "the client closed the request",
                                    type_="invalid_request_error")
            task.result()
        finally:
            task.cancel()
            self.stream.abort()
        return self.final(self.text, self.logprobs)


async def _pull_lines(ref: str, allow_local: bool) -> AsyncIterator[str]:
    """Ollama's pull progress: a status line, the pull (in a thread), then "success"."""
    yield json.dumps({"status": f"pulling {ref}"}) + "\n"
    try:
        path = await asyncio.to_thread(hub.pull, ref, progress=False, allow_local=allow_local)
    except LevanteError as exc:
        yield json.dumps({"error": str(exc)}) + "\n"
        return
    size = file_size(path)
    yield json.dumps({"status": f"pulled {path.name}", "total": size, "completed": size}) + "\n"
    yield json.dumps({"status": "success"}) + "\n"
