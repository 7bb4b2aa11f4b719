"""Load generator: concurrent streaming chat requests against an OpenAI-compatible endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import openai
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from levante.bench.report import BenchReport, summarize
from levante.bench.scenarios import Prompt, PromptBuilder, Scenario
from levante.errors import ConfigError

MAX_DISTINCT_PROMPTS = 64  # prompts built per level; requests beyond cycle through them


@dataclass(frozen=True)
class BenchConfig:
    """Where to send load and how much: one level per concurrency, N requests or S seconds."""

    base_url: str
    model: str | None = None  # None: the first model the endpoint lists
    api_key: str = "EMPTY"
    concurrency: tuple[int, ...] = (1,)
    num_requests: int | None = None  # per level; None (and no duration): 4 x concurrency
    duration_s: float | None = None
    ignore_eos: bool = True  # ask for exactly max_tokens (dropped if the server rejects it)
    temperature: float = 0.0
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ConfigError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.num_requests is not None and self.duration_s is not None:
            raise ConfigError("give --requests or --duration, not both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ConfigError(f"--requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ConfigError(f"--duration must be > 0 seconds, got {self.duration_s}")

    def requests_for(self, concurrency: int) -> int | None:
        """Requests to send at this level (None: until the duration is up)."""
        if self.duration_s is not None:
            return None
        return self.num_requests if self.num_requests is not None else 4 * concurrency


@dataclass
class RequestRecord:
    """What one streamed request measured; times in seconds."""

    start_s: float  # since the level started
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between output chunks
    output_tokens: int = 0
    prompt_tokens: int | None = None
    token_source: str = "chunks"  # "usage" when the server reported completion_tokens
    error: str | None = None


@dataclass
class LevelRun:
    """All records of one scenario at one concurrency, and the level's wall time."""

    scenario: Scenario
    concurrency: int
    records: list[RequestRecord]
    wall_s: float
    prompt_tokens_exact: bool


def _has_output(chunk: Any) -> bool:
    """Whether a chunk carries generated text or tool-call arguments (not just a role)."""
    for choice in chunk.choices or ():
        delta = choice.delta
        if delta is None:
            continue
        if delta.content or getattr(delta, "reasoning_content", None):
            return True
        if any(c.function and (c.function.arguments or c.function.name)
               for c in delta.tool_calls or ()):
            return True
    return False


def _request_kwargs(model: str, prompt: Prompt, max_tokens: int, ignore_eos: bool,
                    temperature: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"model": model, "messages": prompt.messages,
                              "max_tokens": max_tokens, "temperature": temperature,
                              "stream": True, "stream_options": {"include_usage": True}}
    if prompt.tools:
        kwargs["tools"] = prompt.tools
    if ignore_eos:
        kwargs["extra_body"] = {"ignore_eos": True}
    return kwargs


async def stream_request(client: openai.AsyncOpenAI, model: str, prompt: Prompt,
                         max_tokens: int, *, ignore_eos: bool,
                         temperature: float = 0.0) -> RequestRecord:
    """Send one streaming chat request and time its first and following output chunks."""
    record = RequestRecord(start_s=time.perf_counter())
    last = record.start_s
    try:
        stream = await client.chat.completions.create(
            **_request_kwargs(model, prompt, max_tokens, ignore_eos, temperature))
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                record.output_tokens = chunk.usage.completion_tokens
                record.prompt_tokens = chunk.usage.prompt_tokens
                record.token_source = "usage"
            if not _has_output(chunk):
                continue
            if record.ttft_s is None:
                record.ttft_s = now - record.start_s
            else:
                record.itl_s.append(now - last)
            last = now
            if record.token_source == "chunks":
                record.output_tokens += 1
    except (openai.APIError, ValueError) as e:
        record.error = f"{type(e).__name__}: {str(e)[:200]}"
        return record
    record.e2e_s = time.perf_counter() - record.start_s
    if record.ttft_s is None:
        record.error = "stream ended without output"
    return record


async def probe(client: openai.AsyncOpenAI, model: str | None, ignore_eos: bool) -> tuple[str, bool]:
    """The model name to use and whether the server accepts ignore_eos (a warm-up request)."""
    try:
        if model is None:
            models = [m.id async for m in client.models.list()]
            if not models:
                raise ConfigError(f"{client.base_url} lists no models; pass --model")
            model = models[0]
        extra = {"ignore_eos": True} if ignore_eos else None
        try:
            await client.chat.completions.create(model=model, max_tokens=4, extra_body=extra,
                                                 messages=[{"role": "user", "content": "Hi"}])
        except openai.BadRequestError as e:
            if not ignore_eos or "ignore_eos" not in str(e):
                raise
            return model, False
    except openai.APIError as e:
        raise ConfigError(f"{client.base_url}: probe request failed ({e})") from None
    return model, ignore_eos


async def run_level(client: openai.AsyncOpenAI, config: BenchConfig, model: str,
                    scenario: Scenario, prompts: list[Prompt], concurrency: int,
                    on_done: Callable[[], None], *, ignore_eos: bool) -> LevelRun:
    """`concurrency` workers each send one request at a time until the level's budget is spent."""
    total = config.requests_for(concurrency)
    counter = itertools.count()
    records: list[RequestRecord] = []
    level_start = time.perf_counter()
    deadline = level_start + config.duration_s if config.duration_s is not None else None

    async def worker() -> None:
        while True:
            index = next(counter)
            if (total is not None and index >= total) or \
                    (deadline is not None and time.perf_counter() >= deadline):
                return
            record = await stream_request(client, model, prompts[index % len(prompts)],
                                          scenario.output_len, ignore_eos=ignore_eos,
                                          temperature=config.temperature)
            record.start_s -= level_start
            records.append(record)
            on_done()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LevelRun(scenario, concurrency, records, time.perf_counter() - level_start,
                    prompts[0].is_exact)


def run_bench(config: BenchConfig, scenarios: list[Scenario], builder: PromptBuilder, *,
              progress: bool = True) -> BenchReport:
    """Every scenario at every concurrency level, summarized into one report."""
    return asyncio.run(_run_all(config, scenarios, builder, progress))


async def _run_all(config: BenchConfig, scenarios: list[Scenario], builder: PromptBuilder,
                   show_progress: bool) -> BenchReport:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    client = openai.AsyncOpenAI(base_url=config.base_url, api_key=config.api_key,
                                max_retries=0, timeout=config.request_timeout_s)
    async with client:
        model, ignore_eos = await probe(client, config.model, config.ignore_eos)
        levels, offset = [], 0
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=Console(stderr=True),
                      disable=not show_progress) as bar:
            for scenario in scenarios:
                for concurrency in config.concurrency:
                    total = config.requests_for(concurrency)
                    num_prompts = min(total or 4 * concurrency, MAX_DISTINCT_PROMPTS)
                    # fresh text per level too, so a prefix cache cannot replay the last level
                    prompts = [builder.build(scenario, offset + i) for i in range(num_prompts)]
                    offset += num_prompts
                    task = bar.add_task(f"{scenario.name} x{concurrency}", total=total)
                    run = await run_level(client, config, model, scenario, prompts, concurrency,
                                          functools.partial(bar.advance, task),
                                          ignore_eos=ignore_eos)
                    levels.append(summarize(run))
    return BenchReport(base_url=config.base_url, model=model, ignore_eos=ignore_eos,
                       started_at=started, levels=levels)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_server(ref: str, *, port: int | None = None, startup_timeout_s: float = 600.0,
                 extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """Start `levante serve REF` on 127.0.0.1 in a subprocess; yield its /v1 base URL."""
    port = port or _free_port()
    command = [sys.executable, "-m", "levante.cli", "serve", ref, "--host", "127.0.0.1",
               "--port", str(port), *extra_args]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(proc, port, startup_timeout_s, log)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout_s: float, log: Any) -> None:
    """Poll /health until it answers 200; fail with the server's log tail if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read()[-2000:].decode("utf-8", errors="replace")
            raise ConfigError(f"levante serve exited with code {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet: poll again
        time.sleep(0.5)
    raise ConfigError(f"levante serve did not become healthy within {timeout_s:.0f} s")
