"""A request's choices on the AsyncEngine, rendered as OpenAI responses or SSE chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from levante.chat.tool_calls import ChatDelta, ToolCallStreamer
from levante.engine.async_engine import AsyncEngine, RequestStream
from levante.engine.engine import StepOutput
from levante.engine.sampling_params import SamplingParams
from levante.kinds import FinishReason
from levante.server.http import generation_error
from levante.server.metrics import Metrics
from levante.server.protocol import error_body
from levante.tokenizer import Tokenizer

Job = tuple[int, list[int], SamplingParams]


@dataclass
class Choice:
    """One choice's accumulated output."""

    index: int
    num_prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_code: str | None = None
    streamer: ToolCallStreamer | None = None  # when the reply may hold tool calls
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    started: bool = False  # an output has been folded in

    def message(self) -> dict[str, Any]:
        """The whole assistant message in OpenAI's shape."""
        if not self.tool_calls:
            return {"role": "assistant", "content": self.text}
        return {"role": "assistant", "content": self.text or None,
                "tool_calls": self.tool_calls}


class Generation:
    """Runs the choices of one HTTP request and renders them, whole or streamed."""

    def __init__(self, engine: AsyncEngine, metrics: Metrics, tokenizer: Tokenizer,
                 jobs: list[Job], *, n: int, chat: bool, model: str, adapter_id: int = 0,
                 grammar: Any = None, tool_style: str | None = None, echo: bool = False
                 ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.jobs = jobs
        self.n = n
        self.adapter_id = adapter_id
        self.grammar = grammar
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.streams: list[RequestStream] = []
        self.choices = [Choice(i, len(p), streamer=None if tool_style is None else
                               ToolCallStreamer(tokenizer, style=tool_style, stop=params.stop,
                                                include_stop=params.include_stop_str_in_output))
                        for i, p, params in jobs]
        for choice, (_, prompt, params) in zip(self.choices, jobs):
            choice.prompt_ids = prompt
        self.echo = echo  # completions: the prompt (and its logprobs) lead the text
        self.wants_logprobs = [params.logprobs is not None for _, _, params in jobs]
        self.wants_prompt_logprobs = [params.prompt_logprobs is not None for _, _, params in jobs]
        self.start_time = time.monotonic()

    async def start(self) -> None:
        """Submit every choice in one step; if one is refused, none runs (AsyncEngine)."""
        self.streams = await self.engine.add_requests(
            [(prompt, params, f"{self.id}-{index}") for index, prompt, params in self.jobs],
            grammar=self.grammar, adapter_id=self.adapter_id)

    def abort(self) -> None:
        for stream in self.streams:
            stream.abort()

    async def _events(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """Outputs of all choices, interleaved as they come."""
        queue: asyncio.Queue[tuple[int, StepOutput] | None] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            async for out in stream:
                await queue.put((index, out))
            await queue.put(None)

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        remaining = len(tasks)
        last = time.monotonic()
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                now = time.monotonic()
                self._observe(item[1], now - last)
                last = now
                yield item
        finally:
            for task in tasks:
                task.cancel()
            self.abort()

    def _observe(self, out: StepOutput, gap: float) -> None:
        if out.num_output_tokens == 1:
            self.metrics.ttft.observe(time.monotonic() - self.start_time)
        elif out.new_token_ids:
            self.metrics.tpot.observe(gap)
        self.metrics.generation_tokens.inc(len(out.new_token_ids))

    def _update(self, choice: Choice, out: StepOutput) -> ChatDelta:
        """Fold an output into its choice; returns what it adds to the message."""
        if out.prompt_logprobs is not None:
            choice.prompt_logprobs = out.prompt_logprobs
        echoed = ""
        if self.echo and not choice.started:  # legacy echo: the prompt leads text and logprobs
            echoed = self.tokenizer.decode(choice.prompt_ids)
            if self.wants_logprobs[choice.index]:
                choice.logprobs.extend(self._prompt_entries(choice))
        choice.started = True
        choice.token_ids.extend(out.new_token_ids)
        for token, lp, top in zip(out.new_token_ids, out.logprobs, out.top_logprobs):
            if lp is not None:
                choice.logprobs.append(self._logprob(token, lp, top))
        if choice.streamer is None:
            delta = ChatDelta(out.new_text)
        else:  # tool calls are parsed from token ids ([TOOL_CALLS] is a control token)
            delta = choice.streamer.add(out.new_token_ids)
            if out.finished:
                tail = choice.streamer.finish()
                delta = ChatDelta(delta.content + tail.content,
                                  delta.tool_calls + tail.tool_calls)
                choice.tool_calls = [c.to_openai() for c in choice.streamer.calls]
        if echoed:
            delta = ChatDelta(echoed + delta.content, delta.tool_calls)
        choice.text += delta.content
        if out.finished:
            choice.error, choice.error_code = out.error, out.error_code
            called = choice.tool_calls and out.finish_reason == FinishReason.STOP
            choice.finish_reason = FinishReason.TOOL_CALLS if called else out.finish_reason
        return delta

    def _prompt_entries(self, choice: Choice) -> list[dict[str, Any]]:
        """Logprob entries of the prompt's tokens; the first has none (nothing before it)."""
        first = self.tokenizer.token_text(choice.prompt_ids[0])
        entries: list[dict[str, Any]] = [{"token": first, "logprob": None,
                                          "bytes": list(first.encode()), "top_logprobs": None}]
        return entries + [self._logprob(t, lp, top) for t, lp, top in choice.prompt_logprobs or ()]

    def _vllm_prompt_logprobs(self, choice: Choice) -> list[Any] | None:
        """vLLM's `prompt_logprobs`: None, then per token {id: {logprob, rank, decoded_token}}."""
        if not self.wants_prompt_logprobs[choice.index] or choice.prompt_logprobs is None:
            return None
        out: list[Any] = [None]
        for token, logprob, top in choice.prompt_logprobs:
            entry = {str(i): {"logprob": v, "rank": r + 1,
                              "decoded_token": self.tokenizer.token_text(i)}
                     for r, (i, v) in enumerate(top)}
            if str(token) not in entry:
                rank = 1 + sum(v > logprob for _, v in top) if top else None
                entry[str(token)] = {"logprob": logprob, "rank": rank,
                                     "decoded_token": self.tokenizer.token_text(token)}
            out.append(entry)
        return out

    def _logprob(self, token: int, logprob: float,
                 top: list[tuple[int, float]] | None) -> dict[str, Any]:
        text = self.tokenizer.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": (t := self.tokenizer.token_text(i)), "logprob": v,
                                  "bytes": list(t.encode())} for i, v in (top or [])]}

    def usage(self) -> dict[str, int]:
        """The request's token counts (counted into the prompt-token metric: call once)."""
        usage = self._usage_so_far()
        self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        return usage

    def _usage_so_far(self) -> dict[str, int]:
        prompt = sum(c.num_prompt_tokens for c in self.choices[::self.n])
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    async def deltas(self) -> AsyncIterator[tuple[Choice, ChatDelta, StepOutput]]:
        """Each output folded into its choice, with what it adds to the message, as it comes
        (for renderings other than the chat chunks of `sse`)."""
        async for index, out in self._events():
            choice = self.choices[index]
            yield choice, self._update(choice, out), out

    async def collect(self, request: Request) -> dict[str, Any] | Any:
        """Run to the end (aborting if the client goes away) and build the whole response."""
        async def run() -> None:
            async for index, out in self._events():
                self._update(self.choices[index], out)

        task = asyncio.create_task(run())
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and await request.is_disconnected():
                task.cancel()
                self.abort()
                break
        await asyncio.gather(task, return_exceptions=True)
        failed = next((c for c in self.choices if c.error), None)
        if failed is not None:
            raise generation_error(failed.error or "generation failed", failed.error_code)
        return self._whole()

    def _whole(self) -> dict[str, Any]:
        if self.chat:
            choices = [{"index": c.index,
                        "message": c.message(),
                        "logprobs": {"content": c.logprobs} if c.logprobs else None,
                        "finish_reason": c.finish_reason} for c in self.choices]
            for choice, c in zip(choices, self.choices):
                if (scores := self._vllm_prompt_logprobs(c)) is not None:
                    choice["prompt_logprobs"] = scores
            kind = "chat.completion"
        else:
            choices = [{"index": c.index, "text": c.text,
                        "logprobs": _completion_logprobs(c.logprobs) if c.logprobs else None,
                        "finish_reason": c.finish_reason} for c in self.choices]
            for choice, c in zip(choices, self.choices):
                if not self.echo and (scores := self._vllm_prompt_logprobs(c)) is not None:
                    choice["prompt_logprobs"] = scores
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    async def sse(self, *, include_usage: bool, continuous_usage: bool = False
                  ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; with
        `continuous_usage` (vLLM's continuous_usage_stats) every chunk carries the usage so
        far, else `include_usage` adds it once at the end."""
        started: set[int] = set()
        failed = False
        try:
            async for index, out in self._events():
                choice = self.choices[index]
                num_logprobs = len(choice.logprobs)
                delta = self._update(choice, out)
                if out.error:
                    body = error_body(out.error, type_="server_error", code=out.error_code)
                    yield f"data: {json.dumps(body)}\n\n"
                    failed = True
                    break
                chunk = self._chunk(choice, delta, choice.logprobs[num_logprobs:],
                                    first=index not in started)
                started.add(index)
                if continuous_usage:
                    chunk["usage"] = self._usage_so_far()
                elif include_usage:
                    chunk["usage"] = None
                yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage and not failed:
                yield "data: " + json.dumps(self._envelope([], usage=self.usage())) + "\n\n"
        finally:
            self.abort()
        yield "data: [DONE]\n\n"

    def _envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _chunk(self, choice: Choice, delta: ChatDelta, logprobs: list[dict[str, Any]], *,
               first: bool) -> dict[str, Any]:
        if self.chat:
            body_delta: dict[str, Any] = {"content": delta.content}
            if delta.tool_calls:
                body_delta = {"content": delta.content or None, "tool_calls": delta.tool_calls}
            if first:
                body_delta["role"] = "assistant"
            body = {"index": choice.index, "delta": body_delta,
                    "logprobs": {"content": logprobs} if logprobs else None,
                    "finish_reason": choice.finish_reason}
        else:
            body = {"index": choice.index, "text": delta.content,
                    "logprobs": _completion_logprobs(logprobs) if logprobs else None,
                    "finish_reason": choice.finish_reason}
        return self._envelope([body])


def _completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Legacy completions logprobs shape."""
    offsets, position = [], 0
    for e in entries:
        offsets.append(position)
        position += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top_logprobs"] is None else
                             {t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}
