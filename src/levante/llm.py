"""LLM: the Python API: load a model once, then generate or chat, batched."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from levante.bundle import Bundle, load
from levante.chat.request import ChatRequests
from levante.chat.tool_calls import parse_tool_calls
from levante.config import EngineConfig
from levante.engine.engine import Engine, StepOutput
from levante.engine.sampling_params import SamplingParams
from levante.errors import ConfigError, RequestError
from levante.kinds import FinishReason
from levante.load_config import DTYPES, LoadConfig  # noqa: F401 - DTYPES: older importers
from levante.structured import Grammar

Prompt = str | Sequence[int]


@dataclass
class Completion:
    """One finished generation, with the speeds measured for it."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    error: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI-shaped

    def to_json(self) -> dict[str, Any]:
        """The shape `levante generate --json` prints (shared/DESIGN.md)."""
        return {"prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids,
                "text": self.text, "finish_reason": self.finish_reason,
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


class LLM:
    """A model ready to generate: `LLM("smollm2").generate("Hello")`.

    How it loads is one `LoadConfig`: pass `load_config=`, or the keyword arguments that
    build it (device, dtype, quant, kv_cache_dtype, max_model_len, kv_cache_memory; all
    default to "auto" / the model's own values).
    """

    def __init__(self, ref: str | Bundle, *, dtype: str | None = None,
                 engine_config: EngineConfig | None = None, max_model_len: int | None = None,
                 device: str | None = None, quant: str | None = None,
                 kv_cache_dtype: str | None = None, kv_cache_memory: int | None = None,
                 load_config: LoadConfig | None = None) -> None:
        keywords: dict[str, Any] = {
            "dtype": dtype, "max_model_len": max_model_len, "device": device, "quant": quant,
            "kv_cache_dtype": kv_cache_dtype, "kv_cache_memory": kv_cache_memory}
        given = {k: v for k, v in keywords.items() if v is not None}
        if load_config is not None and given:
            raise ConfigError(f"LLM takes load_config or the keywords {', '.join(given)}, "
                              "not both")
        if isinstance(ref, Bundle):
            self.bundle = ref
        else:
            self.bundle = load(ref, load_config or LoadConfig(**given))
        loaded = self.bundle.load_config
        config = engine_config or EngineConfig(max_model_len=self.bundle.config.max_seq_len,
                                               kv_cache_memory=loaded.kv_cache_memory,
                                               kv_cache_dtype=loaded.kv_cache_dtype)
        self.engine = Engine(self.bundle.model, self.bundle.tokenizer, config)
        self.tokenizer = self.bundle.tokenizer
        self.chats = ChatRequests(self.bundle)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt (with BOS if the model uses one) or ids as given."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=self.tokenizer.should_add_bos)
        return [int(t) for t in prompt]

    def encode_chat(self, messages: list[dict[str, Any]], *,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation in the model's chat format."""
        if self.bundle.chat_format is None:
            raise RequestError("this model has no chat template; use generate() with a prompt",
                               param="messages")
        return self.bundle.chat_format.encode(messages, tools=tools)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | None = None) -> list[Completion]:
        """Complete each prompt (text or token ids); all run together as one batch."""
        is_one = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        batch = cast(Sequence[Prompt], [prompts] if is_one else prompts)
        return self._run([self.encode_prompt(p) for p in batch], params or SamplingParams())

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None, *,
             tools: list[dict[str, Any]] | None = None,
             tool_choice: str | dict[str, Any] | None = None,
             response_format: dict[str, Any] | None = None) -> Completion:
        """Answer a conversation (OpenAI-style message dicts); with tools or a response_format
        the output is constrained by grammar, and calls come back in `tool_calls`."""
        prepared = self.chats.prepare(messages, tools=tools, tool_choice=tool_choice,
                                      response_format=response_format)
        params = params or SamplingParams()
        done = self._run([prepared.prompt_ids], params, grammar=prepared.grammar)[0]
        if prepared.tool_style is not None:
            content, calls = parse_tool_calls(
                done.token_ids, self.tokenizer, style=prepared.tool_style, stop=params.stop,
                include_stop=params.include_stop_str_in_output)
            done.text = content or ""
            done.tool_calls = [c.to_openai() for c in calls]
            if calls and done.finish_reason == FinishReason.STOP:
                done.finish_reason = FinishReason.TOOL_CALLS
        return done

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        """Yield each step's output for one request until it finishes."""
        request_id = self.engine.add_request(prompt_ids, params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(request_id)

    def _run(self, prompt_ids: list[list[int]], params: SamplingParams, *,
             grammar: Grammar | None = None) -> list[Completion]:
        start = time.perf_counter()
        ids = [self.engine.add_request(p, params, grammar=grammar) for p in prompt_ids]
        completions = {rid: Completion(p) for rid, p in zip(ids, prompt_ids)}
        first: dict[str, float] = {}
        pending = set(ids)
        while pending:
            for out in self.engine.step():
                done = completions.get(out.request_id)
                if done is None:
                    continue
                first.setdefault(out.request_id, time.perf_counter())
                _accumulate(done, out)
                if out.finished:
                    pending.discard(out.request_id)
                    _speeds(done, start, first[out.request_id], time.perf_counter())
        return [completions[rid] for rid in ids]


def _accumulate(done: Completion, out: StepOutput) -> None:
    done.token_ids.extend(out.new_token_ids)
    done.text += out.new_text
    done.logprobs.extend(out.logprobs)
    done.top_logprobs.extend(out.top_logprobs)
    if out.finished:
        done.finish_reason = out.finish_reason
        done.error = out.error


def _speeds(done: Completion, start: float, first: float, end: float) -> None:
    done.prefill_tokens_per_s = len(done.prompt_token_ids) / max(first - start, 1e-9)
    if len(done.token_ids) > 1:
        done.decode_tokens_per_s = (len(done.token_ids) - 1) / max(end - first, 1e-9)
