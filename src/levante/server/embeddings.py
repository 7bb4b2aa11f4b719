"""Embeddings over HTTP: inputs to token ids, vectors from the engine, OpenAI and Ollama shapes.

Vectors are the served model's final-norm hidden states, mean-pooled over the input's tokens
(llama.cpp's `--embeddings`) unless the GGUF names another `pooling_type` or `levante serve
--embedding-pooling` says otherwise ("last": what Ollama 0.12 returns for a model without one).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import TYPE_CHECKING, Any

import torch

from levante.chat.request import check_prompt_size
from levante.engine.admission import check_vocabulary
from levante.engine.embedding import GGUF_POOLING, Pooling
from levante.errors import ConfigError, ContextLengthError, RequestError
from levante.kinds import WeightFormat
from levante.server.ollama_protocol import EmbedBody, EmbeddingsBody, Options
from levante.server.protocol import EmbeddingRequest

if TYPE_CHECKING:
    from levante.bundle import Bundle
    from levante.server.config import ServerConfig
    from levante.server.routes import ServerState


def serving_pooling(config: ServerConfig, bundle: Bundle) -> Pooling:
    """The pooling this server embeds with: the flag's, else the GGUF's `<arch>.pooling_type`
    (llama.cpp's enum), else mean. A reranker's "rank" (4) is refused unless overridden."""
    if config.embedding_pooling is not None:
        return Pooling(config.embedding_pooling)
    if bundle.format != WeightFormat.GGUF:
        return Pooling.MEAN
    from levante.weights.gguf import GGUFFile

    metadata = GGUFFile(bundle.path).metadata
    key = f"{metadata.get('general.architecture')}.pooling_type"
    value = metadata.get(key)
    if value is None:
        return Pooling.MEAN
    if not isinstance(value, int) or value not in GGUF_POOLING:
        raise ConfigError(f"{bundle.path}: {key} is {value!r}, a pooling this server does not "
                          "compute (4 is a reranker's); pass --embedding-pooling mean|cls|last")
    return GGUF_POOLING[value]


async def _embed(state: ServerState, prompts: list[list[int]], *,
                 adapter_id: int = 0) -> torch.Tensor:
    """Vectors of token-id inputs from the engine, counted against the queue bound."""
    state.check_capacity(len(prompts), what="inputs", param="input")
    return await state.engine.embed(prompts, pooling=state.embedding_pooling,
                                    adapter_id=adapter_id)


def l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    """[n, dim] rows scaled to length 1, as Ollama's `normalize` (a zero row stays zero)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def base64_floats(vector: torch.Tensor) -> str:
    """OpenAI's `encoding_format: "base64"`: the little-endian float32 bytes, base64."""
    return base64.b64encode(vector.to(torch.float32).numpy().astype("<f4").tobytes()).decode()


def _text_ids(state: ServerState, text: str) -> list[int]:
    """A text as the model reads a raw prompt (BOS where the model adds one)."""
    tokenizer = state.bundle.tokenizer
    return tokenizer.encode(text, add_bos=tokenizer.should_add_bos)


def _openai_ids(state: ServerState, item: str | list[int], index: int) -> list[int]:
    """Token ids of one /v1/embeddings input; 400 for ids outside the vocabulary or an input
    longer than the context (OpenAI refuses, it does not truncate)."""
    context = state.bundle.config.max_seq_len
    if isinstance(item, str):
        check_prompt_size(state.bundle, len(item), param="input")
        ids = _text_ids(state, item)
    else:
        check_vocabulary(item, state.bundle.config.vocab_size, param="input")
        ids = item
    if len(ids) > context:
        raise ContextLengthError(f"this model's maximum context length is {context} tokens; "
                                 f"input[{index}] has {len(ids)} tokens", param="input")
    return ids


async def openai_embeddings(state: ServerState, body: EmbeddingRequest) -> dict[str, Any]:
    """The /v1/embeddings object: unit-length vectors (as OpenAI's and Ollama's) and usage."""
    adapter_id = state.check_model(body.model)
    dim = state.bundle.config.dim
    if body.dimensions is not None and body.dimensions != dim:
        raise RequestError(f"dimensions: this model's embeddings have {dim} dimensions and it "
                           "was not trained to shorten them; leave dimensions out",
                           param="dimensions", code="unsupported_parameter")
    items = body.inputs()
    prompts = await asyncio.to_thread(
        lambda: [_openai_ids(state, item, i) for i, item in enumerate(items)])
    vectors = l2_normalize(await _embed(state, prompts, adapter_id=adapter_id))
    num_tokens = sum(len(p) for p in prompts)
    state.metrics.prompt_tokens.inc(num_tokens)
    encode = base64_floats if body.encoding_format == "base64" else torch.Tensor.tolist
    return {"object": "list", "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}


def _ollama_ids(state: ServerState, texts: list[str], *, context: int,
                truncate: bool) -> list[list[int]]:
    """Ollama's /api/embed inputs: cut to `context` tokens, or refused when `truncate` is off."""
    prompts = []
    for index, text in enumerate(texts):
        ids = _text_ids(state, text)
        if not ids:
            raise RequestError(f"input[{index}] is empty", param="input")
        if len(ids) > context:
            if not truncate:
                raise ContextLengthError(
                    f"input exceeds maximum context length: input[{index}] has {len(ids)} "
                    f"tokens, the context is {context}", param="input")
            ids = ids[:context]
        prompts.append(ids)
    return prompts


async def ollama_embed(state: ServerState, body: EmbedBody, options: Options) -> dict[str, Any]:
    """The /api/embed object: unit-length vectors, Ollama's counts and durations (ns)."""
    started = time.perf_counter_ns()
    texts = body.texts()
    if not texts:
        return {"model": body.model, "embeddings": []}
    context = min(options.num_ctx or state.bundle.config.max_seq_len,
                  state.bundle.config.max_seq_len)
    prompts = await asyncio.to_thread(_ollama_ids, state, texts, context=context,
                                      truncate=body.truncate)
    vectors = l2_normalize(await _embed(state, prompts))
    if body.dimensions is not None and body.dimensions < vectors.shape[-1]:
        vectors = l2_normalize(vectors[:, :body.dimensions])
    num_tokens = sum(len(p) for p in prompts)
    state.metrics.prompt_tokens.inc(num_tokens)
    return {"model": body.model, "embeddings": vectors.tolist(),
            "total_duration": time.perf_counter_ns() - started,
            "load_duration": 0,  # the model is loaded when the server starts
            "prompt_eval_count": num_tokens}


async def ollama_embeddings(state: ServerState, body: EmbeddingsBody) -> dict[str, Any]:
    """The /api/embeddings object: the raw vector, not normalized (as Ollama's older route);
    an input longer than the context is refused."""
    if not body.prompt:
        return {"embedding": []}
    context = min((body.options or Options()).num_ctx or state.bundle.config.max_seq_len,
                  state.bundle.config.max_seq_len)
    check_prompt_size(state.bundle, len(body.prompt), param="prompt")
    prompts = await asyncio.to_thread(_ollama_ids, state, [body.prompt], context=context,
                                      truncate=False)
    vectors = await _embed(state, prompts)
    state.metrics.prompt_tokens.inc(len(prompts[0]))
    return {"embedding": vectors[0].tolist()}
