"""AsyncEngine: one thread owns the Engine and steps it; asyncio callers submit and stream."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from levante.engine.embedding import EmbeddingJob, Pooling
from levante.engine.engine import Engine, StepOutput
from levante.engine.sampling_params import SamplingParams
from levante.errors import RequestError
from levante.kinds import FinishReason

log = logging.getLogger(__name__)


@dataclass
class _Submit:
    prompt_ids: Sequence[int]
    params: SamplingParams
    request_id: str
    outputs: asyncio.Queue[StepOutput]
    accepted: asyncio.Future[str]
    loop: asyncio.AbstractEventLoop
    grammar: Any = None
    adapter_id: int = 0


@dataclass
class _Embed:
    """Prompts to embed on the engine thread, a chunk between two steps."""

    job: EmbeddingJob
    done: asyncio.Future[torch.Tensor]
    loop: asyncio.AbstractEventLoop
    is_cancelled: bool = False  # the caller left: the engine thread drops the job


class AsyncEngine:
    """Thread-safe front of an Engine: `async for out in engine.generate(ids, params)`.

    The engine thread drains a command queue (submit/abort/embed) between steps, so new
    requests join the running batch at the next step, aborts free their blocks within one
    step, and embeddings run one chunk (`EmbeddingJob`) before each step, oldest job first.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop,
                                       asyncio.Queue[StepOutput]]] = {}
        self._embeddings: deque[_Embed] = deque()  # engine thread only
        self.num_embedding_inputs = 0  # prompts of embed() calls not yet answered
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.is_healthy = True
        self.is_draining = False  # shutting down: no new requests (see server.listener)
        self.death: str | None = None  # why the engine thread died, once it has
        self.on_step: Callable[[list[StepOutput]], None] | None = None
        self.on_death: Callable[[], None] | None = None  # the server's exit (app.serve)

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="levante-engine",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Abort everything still running and stop the thread."""
        self._stopping.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    @property
    def num_active(self) -> int:
        """Requests accepted and not yet finished (including those queued to be added)."""
        return len(self._streams)

    async def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                          request_id: str, *, grammar: Any = None,
                          adapter_id: int = 0) -> RequestStream:
        """Submit a request; raises RequestError if the engine refuses it (or is dead), else
        its stream."""
        (stream,) = await self.add_requests([(prompt_ids, params, request_id)],
                                            grammar=grammar, adapter_id=adapter_id)
        return stream

    async def add_requests(self, jobs: Sequence[tuple[Sequence[int], SamplingParams, str]], *,
                           grammar: Any = None, adapter_id: int = 0) -> list[RequestStream]:
        """Submit (prompt ids, params, request id) jobs as one command: they join the same
        step (the n choices of one request), and share the prefill of a common prompt. If
        one is refused, the others are aborted and its RequestError raised."""
        if self.death is not None:
            raise self._dead_error()
        if self.is_draining:
            raise RequestError("the server is shutting down; retry the request (on another "
                               "replica)", code="server_shutdown")
        loop = asyncio.get_running_loop()
        submits = [_Submit(prompt_ids, params, request_id, asyncio.Queue(), loop.create_future(),
                           loop, grammar, adapter_id) for prompt_ids, params, request_id in jobs]
        self._commands.put(submits)
        if self.death is not None:  # died between the check and the put: nobody will answer
            for submit in submits:
                _set_exception(submit.accepted, self._dead_error())
        try:
            results = await asyncio.gather(*(s.accepted for s in submits),
                                           return_exceptions=True)
        except asyncio.CancelledError:
            for submit in submits:
                self.abort(submit.request_id)
            raise
        refused = next((r for r in results if isinstance(r, BaseException)), None)
        if refused is not None:
            for submit, result in zip(submits, results):
                if not isinstance(result, BaseException):
                    self.abort(submit.request_id)
            raise refused
        return [RequestStream(self, s.request_id, s.outputs) for s in submits]

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[StepOutput]:
        """Submit a request and yield its outputs; leaving early aborts it."""
        stream = await self.add_request(prompt_ids, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    async def embed(self, prompts: Sequence[Sequence[int]], *, pooling: Pooling,
                    adapter_id: int = 0) -> torch.Tensor:
        """Embeddings of token-id prompts ([n, dim] float32, not normalized), computed by
        the engine thread in chunks of max_num_batched_tokens between steps; raises
        RequestError if the engine is dead."""
        if self.death is not None:
            raise self._dead_error()
        loop = asyncio.get_running_loop()
        job = EmbeddingJob(prompts, pooling=pooling, adapter_id=adapter_id,
                           chunk_tokens=self.engine.config.max_num_batched_tokens)
        command = _Embed(job, loop.create_future(), loop)
        self.num_embedding_inputs += len(prompts)
        try:
            self._commands.put(command)
            if self.death is not None:  # died between the check and the put: nobody answers
                _set_exception(command.done, self._dead_error())
            return await command.done
        except asyncio.CancelledError:
            command.is_cancelled = True
            raise
        finally:
            self.num_embedding_inputs -= len(prompts)

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to abort a request (safe from any thread)."""
        self._commands.put(("abort", request_id))

    def begin_drain(self) -> None:
        """Refuse new requests from now on; those accepted run on."""
        self.is_draining = True

    def end_all(self, message: str) -> None:
        """End every accepted request now with `message` (error code "server_shutdown")."""
        self._commands.put(("end_all", message))

    def _dead_error(self) -> RequestError:
        return RequestError(f"the engine has stopped ({self.death}); the server is exiting",
                            code="engine_dead")

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            log.exception("the engine thread died")
            self._die(f"{type(exc).__name__}: {exc}")

    def _die(self, reason: str) -> None:
        """End every accepted and queued request with an error at once, turn /health
        unhealthy and tell the server (which exits non-zero: see app.serve)."""
        self.is_healthy = False
        self.death = reason
        message = f"the engine stopped: {reason}"
        for request_id in list(self._streams):
            self._deliver(StepOutput(request_id, [], "", True, FinishReason.ERROR, 0, 0,
                                     error=message))
        self._end_embeddings(self._dead_error())
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            for submit in command if isinstance(command, list) else [command]:
                if isinstance(submit, _Submit):
                    submit.loop.call_soon_threadsafe(_set_exception, submit.accepted,
                                                     self._dead_error())
                elif isinstance(submit, _Embed):
                    submit.loop.call_soon_threadsafe(_set_exception, submit.done,
                                                     self._dead_error())
        if self.on_death is not None:
            self.on_death()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._drain(block=not (self.engine.has_work or self._embeddings))
            if self._stopping.is_set():
                break
            if self._embeddings:
                self._embed_chunk()
            if not self.engine.has_work:
                continue
            outputs = self.engine.step()
            if self.on_step is not None:
                self.on_step(outputs)
            for out in outputs:
                self._deliver(out)
        self._shut_down("the server is shutting down")

    def _drain(self, *, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: Any) -> None:
        if isinstance(command, list):
            for submit in command:
                self._handle(submit)
        elif isinstance(command, _Submit):
            try:
                self.engine.add_request(command.prompt_ids, command.params, command.request_id,
                                        grammar=command.grammar, adapter_id=command.adapter_id)
            except Exception as exc:  # noqa: BLE001 - handed to the caller's await
                command.loop.call_soon_threadsafe(_set_exception, command.accepted, exc)
                return
            self._streams[command.request_id] = (command.loop, command.outputs)
            command.loop.call_soon_threadsafe(_set_result, command.accepted,
                                              command.request_id)
        elif isinstance(command, _Embed):
            self._embeddings.append(command)
        elif command[0] == "end_all":
            self._shut_down(command[1])
        else:
            _, request_id = command
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

    def _embed_chunk(self) -> None:
        """One chunk of the oldest embedding job; answer it when its last prompt is done."""
        command = self._embeddings[0]
        job = command.job
        try:
            if command.is_cancelled:
                raise RequestError("the caller left")
            if not job.advance(self.engine) and not self.engine.has_work:
                raise RequestError("the KV pool has no free blocks for this input")
        except Exception as exc:  # noqa: BLE001 - handed to the caller's await
            self._embeddings.popleft()
            job.release(self.engine)
            command.loop.call_soon_threadsafe(_set_exception, command.done, exc)
            return
        if job.is_done:
            self._embeddings.popleft()
            vectors = job.result(self.engine.model.config.dim)
            command.loop.call_soon_threadsafe(_set_result, command.done, vectors)

    def _shut_down(self, message: str) -> None:
        """Abort every accepted request and embedding; each ends with `message` (code
        "server_shutdown", which the server answers with a 503 or an error event)."""
        for request_id in list(self._streams):
            self.engine.abort(request_id)
            self._deliver(StepOutput(request_id, [], "", True, FinishReason.ABORT, 0, 0,
                                     error=message, error_code="server_shutdown"))
        self._end_embeddings(RequestError(message, code="server_shutdown"))

    def _end_embeddings(self, exc: RequestError) -> None:
        """Answer every queued embedding job with `exc` (shutdown, or the engine died)."""
        while self._embeddings:
            command = self._embeddings.popleft()
            command.job.release(self.engine)
            command.loop.call_soon_threadsafe(_set_exception, command.done, exc)

    def _deliver(self, out: StepOutput) -> None:
        entry = self._streams.get(out.request_id)
        if entry is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        loop, outputs = entry
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, out)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            if self.death is None:
                self.engine.abort(out.request_id)


class RequestStream:
    """Outputs of one accepted request; `abort()` if the consumer leaves before the end."""

    def __init__(self, engine: AsyncEngine, request_id: str,
                 outputs: asyncio.Queue[StepOutput]) -> None:
        self.engine = engine
        self.request_id = request_id
        self._outputs = outputs
        self.is_finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self.is_finished:
            raise StopAsyncIteration
        out = await self._outputs.get()
        self.is_finished = out.finished
        return out

    def abort(self) -> None:
        if not self.is_finished:
            self.is_finished = True
            self.engine.abort(self.request_id)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
