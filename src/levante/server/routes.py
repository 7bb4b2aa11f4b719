"""OpenAI routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /health."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from levante.bundle import Bundle
from levante.chat.fim import fim_prompt_ids
from levante.chat.request import ChatRequests, check_prompt_size
from levante.config import EngineConfig
from levante.engine.admission import check_vocabulary
from levante.engine.async_engine import AsyncEngine
from levante.engine.embedding import Pooling
from levante.engine.engine import Engine
from levante.engine.sampling_params import SamplingParams
from levante.errors import LevanteError, RequestError
from levante.heap import release_free_memory
from levante.server.config import ServerConfig
from levante.server.embeddings import openai_embeddings, serving_pooling
from levante.server.http import HTTPError, error_response, parse_body
from levante.server.metrics import Metrics
from levante.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from levante.server.responses import Generation

if TYPE_CHECKING:
    from levante.finetune.adapters import AdapterSet
    from levante.server.ollama_aliases import Alias

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share: the model bundle, the async engine, names, metrics."""

    bundle: Bundle
    engine: AsyncEngine
    model_names: tuple[str, ...]
    metrics: Metrics
    max_queue: int
    created: int
    adapters: AdapterSet | None = None
    # Ollama names made by /api/create and /api/copy (tagged name -> alias), in memory
    aliases: dict[str, Alias] = field(default_factory=dict)
    embedding_pooling: Pooling = Pooling.MEAN
    chats: ChatRequests = field(init=False)

    def __post_init__(self) -> None:
        self.chats = ChatRequests(self.bundle)
        # Off the start path, and before clients come: the early size check's bound (~0.2 s
        # for Tekken's 131K pieces) and what the first chat would build (llguidance's
        # tokenizer, the plain-text tokenizer): those hold the GIL for up to 0.2 s each, which
        # stalled every connection when a first request built them.
        threading.Thread(target=self._warm_up, daemon=True).start()

    def _warm_up(self) -> None:
        self.bundle.tokenizer.max_token_chars()
        try:
            self.chats.warm_up()
        except LevanteError as error:  # a template may refuse a one-message chat: no harm
            log.info("chat warm-up skipped: %s", error)
        release_free_memory()  # what building those freed, handed back before clients come

    @classmethod
    def build(cls, config: ServerConfig, bundle: Bundle | None = None) -> ServerState:
        from levante.bundle import load

        bundle = bundle or load(config.ref, config.load_config)
        engine_config = EngineConfig(
            max_model_len=bundle.config.max_seq_len, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_queue=config.max_queue,
            kv_cache_memory=config.kv_cache_memory, num_kv_blocks=config.num_kv_blocks,
            kv_cache_dtype=bundle.load_config.kv_cache_dtype,
            enable_prefix_caching=config.enable_prefix_caching,
            num_speculative_tokens=config.num_speculative_tokens,
            batch_invariant=config.batch_invariant)
        adapters = None
        if config.lora:
            from levante.finetune.adapters import attach_adapters

            adapters = attach_adapters(bundle.model, {n: Path(p) for n, p in config.lora})
        engine = Engine(bundle.model, bundle.tokenizer, engine_config, adapters=adapters)
        async_engine = AsyncEngine(engine)
        pool = engine.pool
        metrics = Metrics(running=lambda: async_engine.num_running,
                          waiting=lambda: async_engine.num_waiting,
                          kv_used=lambda: pool.num_blocks - pool.num_free,
                          kv_total=pool.num_blocks, engine=engine)
        names = tuple(dict.fromkeys(n for n in (config.served_model_name, config.ref,
                                                bundle.name) if n))
        return cls(bundle, async_engine, names, metrics, config.max_queue, int(time.time()),
                   adapters, embedding_pooling=serving_pooling(config, bundle))

    @property
    def served_names(self) -> tuple[str, ...]:
        """The base model's names, then each LoRA adapter's."""
        return self.model_names + (tuple(self.adapters.names) if self.adapters else ())

    def check_model(self, name: str) -> int:
        """The adapter id serving `name` (0 = the base model); 404 for an unknown name."""
        if name in self.model_names:
            return 0
        if self.adapters is not None and name in self.adapters.names:
            return self.adapters.index_of(name)
        raise HTTPError(404, f"model {name!r} does not exist; this server has "
                        f"{', '.join(self.served_names)}", type_="invalid_request_error",
                        param="model", code="model_not_found")

    def check_admissible(self, prompts: list[list[int]], params: SamplingParams, *,
                         num_new: int) -> None:
        """503 while the queue is full, unless the request could never be admitted: that
        is a 400 even while the server is busy. (With room in the queue the engine's own
        admission gives the same 400, so the prompt is not checked twice.)"""
        try:
            self.check_capacity(num_new, what="sequences (prompts x n)", param="n")
        except HTTPError:
            for prompt_ids in prompts:
                self.engine.engine.check_request(prompt_ids, params)
            raise

    def check_capacity(self, num_new: int, *, what: str, param: str) -> None:
        """400 for more than the queue holds; 503 + Retry-After while the accepted requests
        and the embedding inputs not yet answered fill it."""
        if num_new > self.max_queue:
            raise RequestError(f"this request asks for {num_new} {what}; the server queues "
                               f"at most {self.max_queue}", param=param)
        engine = self.engine
        if engine.num_active + engine.num_embedding_inputs + num_new > self.max_queue:
            raise HTTPError(503, "the server is at capacity; retry later",
                            type_="server_overloaded", code="queue_full",
                            headers={"Retry-After": "1"})


def register(app: FastAPI, config: ServerConfig, state: ServerState) -> None:
    """Add the OpenAI routes to `app`."""
    limit = config.max_body_bytes

    @app.get("/health")
    async def health() -> Response:
        if not state.engine.is_healthy:
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        if state.engine.is_draining:  # a balancer stops sending us requests
            return JSONResponse({"status": "draining"}, status_code=503,
                                headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": state.created, "owned_by": "levante"}
            for n in state.served_names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest, limit)
        return await _complete(request, state, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = await parse_body(request, CompletionRequest, limit)
        return await _complete(request, state, body, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        try:
            body: EmbeddingRequest = await parse_body(request, EmbeddingRequest, limit)
            response: Response = JSONResponse(await openai_embeddings(state, body))
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            response = error_response(exc)
        state.metrics.requests.labels("embeddings", str(response.status_code)).inc()
        return response

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        """vLLM's: {count, max_model_len, tokens} of a text prompt or chat messages."""
        body: TokenizeRequest = await parse_body(request, TokenizeRequest, limit)
        if body.model is not None:
            state.check_model(body.model)
        ids = await asyncio.to_thread(_tokenize, state, body)
        return JSONResponse({"count": len(ids), "max_model_len": state.bundle.config.max_seq_len,
                             "tokens": ids, "token_strs": None})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        """vLLM's: {prompt} of token ids."""
        body: DetokenizeRequest = await parse_body(request, DetokenizeRequest, limit)
        if body.model is not None:
            state.check_model(body.model)
        check_vocabulary(body.tokens, state.bundle.config.vocab_size, param="tokens")
        text = await asyncio.to_thread(state.bundle.tokenizer.decode, body.tokens)
        return JSONResponse({"prompt": text})


def _tokenize(state: ServerState, body: TokenizeRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise RequestError("give either prompt or messages", param="prompt")
    if body.messages is not None:
        if not body.add_generation_prompt:
            raise RequestError("add_generation_prompt false is not supported",
                               param="add_generation_prompt")
        return state.chats.prepare(body.messages).prompt_ids
    tokenizer = state.bundle.tokenizer
    check_prompt_size(state.bundle, len(body.prompt or ""), param="prompt")
    return tokenizer.encode(body.prompt or "",
                            add_bos=body.add_special_tokens and tokenizer.should_add_bos)


async def _complete(request: Request, state: ServerState,
                    body: ChatCompletionRequest | CompletionRequest, *, chat: bool) -> Response:
    endpoint = "chat" if chat else "completions"
    try:
        response = await _handle(request, state, body, chat=chat)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
        response = error_response(exc)
    state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    return response


async def _handle(request: Request, state: ServerState,
                  body: ChatCompletionRequest | CompletionRequest, *, chat: bool) -> Response:
    body.check_extras()
    adapter_id = state.check_model(body.model)
    params = body.params()
    grammar, tool_style = None, None
    if chat:
        assert isinstance(body, ChatCompletionRequest)
        prepared = await asyncio.to_thread(
            state.chats.prepare, body.messages, tools=body.tools, tool_choice=body.tool_choice,
            response_format=body.response_format, parallel_tool_calls=body.parallel_tool_calls)
        prompts = [prepared.prompt_ids]
        grammar, tool_style = prepared.grammar, prepared.tool_style
    else:
        assert isinstance(body, CompletionRequest)
        prompts = await asyncio.to_thread(
            lambda: [_encode_text(state, p, suffix=body.suffix, model=body.model)
                     for p in body.prompts()])
    jobs = _jobs(prompts, params, body.n)
    state.check_admissible(prompts, params, num_new=len(jobs))
    stream = Generation(state.engine, state.metrics, state.bundle.tokenizer, jobs,
                        n=body.n, chat=chat, model=body.model, adapter_id=adapter_id,
                        grammar=grammar, tool_style=tool_style,
                        echo=not chat and bool(getattr(body, "echo", False)))
    await stream.start()
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)
        return StreamingResponse(stream.sse(include_usage=usage, continuous_usage=continuous),
                                 media_type="text/event-stream")
    return JSONResponse(await stream.collect(request))


def _encode_text(state: ServerState, prompt: str | list[int], *, suffix: str | None,
                 model: str) -> list[int]:
    """A prompt's ids: text encoded (a fill-in-the-middle prompt with a non-empty `suffix`,
    where an empty prompt is the start of a file), token ids as given."""
    tokenizer = state.bundle.tokenizer
    if isinstance(prompt, str):
        if not prompt and not suffix:
            raise RequestError("prompt is empty", param="prompt")
        check_prompt_size(state.bundle, len(prompt) + len(suffix or ""), param="prompt")
        if suffix:
            return fim_prompt_ids(tokenizer, prompt, suffix, model=model)
        return tokenizer.encode(prompt, add_bos=tokenizer.should_add_bos)
    if suffix:
        raise RequestError("suffix needs a text prompt: token-id prompts are sent as they are",
                           param="suffix")
    if not all(isinstance(t, int) for t in prompt):
        raise RequestError("prompt token ids must be integers", param="prompt")
    return prompt


def _jobs(prompts: list[list[int]], params: SamplingParams, n: int
          ) -> list[tuple[int, list[int], SamplingParams]]:
    """(choice index, prompt ids, params) per choice; seeded choices get seed + index."""
    jobs = []
    for p_index, prompt in enumerate(prompts):
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            jobs.append((p_index * n + i, prompt,
                         params if seed == params.seed else params.replace(seed=seed)))
    return jobs
