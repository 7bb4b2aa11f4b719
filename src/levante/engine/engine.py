"""Engine: admits requests and steps them: schedule -> run -> sample -> update."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from levante.config import EngineConfig
from levante.engine.admission import check_prompt, resolve_max_tokens
from levante.engine.drafts import verify_drafts
from levante.engine.kv_blocks import BlockPool
from levante.engine.kv_budget import kv_cache_dtype, kv_pool_blocks
from levante.engine.kv_cache import KVCache
from levante.engine.output import TextState
from levante.engine.penalties import TokenCounts
from levante.engine.request import Request, RequestStatus
from levante.engine.runner import ModelRunner
from levante.engine.sampler import Sampler, SamplerOutput, make_generator
from levante.engine.sampling_params import SamplingParams
from levante.engine.scheduler import Batch, Scheduler
from levante.errors import RequestError
from levante.heap import compact_heap
from levante.kinds import FinishReason
from levante.model import Transformer
from levante.quant import kernels
from levante.structured import Grammar, MatcherError, fill_masks
from levante.tokenizer import Tokenizer

if TYPE_CHECKING:  # peft (behind adapters) is heavy: imported only when adapters are served
    from levante.finetune.adapters import AdapterSet

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one step produced for one request: new tokens and text, and whether it ended."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    error: str | None = None
    error_code: str | None = None  # e.g. "server_shutdown": the server maps it to a status
    # with prompt_logprobs, on the request's first output: (token, logprob, top) from position 1
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


def invariant_kernels(model: Transformer) -> bool:
    """Whether a row's numbers do not depend on its batch: float32 on the CPU with the
    compiled kernels (paged attention, the quantized GEMMs; LoRA deltas in float64) and no
    float nn.Linear (BLAS rounds 1-4 rows differently from 17)."""
    return (model.rope_cos.device.type == "cpu" and kernels.available()
            and model.model.norm.weight.dtype == torch.float32
            and not any(type(m) is torch.nn.Linear for m in model.modules()))


class Engine:
    """Continuous-batching generation over a paged KV cache, one `step()` at a time."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None,
                 config: EngineConfig | None = None, *, adapters: AdapterSet | None = None
                 ) -> None:
        self.model = model
        with compact_heap():  # the parts' freed arrays leave no resident holes
            model.fuse_projections()  # q/k/v and gate/up as one matmul each: fewer, larger calls
        self.tokenizer = tokenizer
        self.config = config or EngineConfig(max_model_len=model.config.max_seq_len)
        dtype = kv_cache_dtype(model, self.config)
        num_blocks = kv_pool_blocks(model, self.config, dtype)
        self.pool = BlockPool(num_blocks, enable_caching=self.config.enable_prefix_caching)
        spare = int(self.config.decode_graphs != "off")  # decode graphs pad rows into it
        cache = KVCache(model.config, num_blocks=num_blocks + spare,
                        block_size=self.config.block_size, dtype=dtype,
                        device=model.rope_cos.device)
        self.runner = ModelRunner(model, cache, adapters=adapters,
                                  attention_backend=self.config.attention_backend,
                                  decode_graphs=self.config.decode_graphs,
                                  max_num_seqs=self.config.max_num_seqs,
                                  max_model_len=self.config.max_model_len)
        # Batch invariance by splitting, where the kernels do not give it already.
        self.split_batches = self.config.batch_invariant and not (
            invariant_kernels(model) and self.runner.attention_backend == "cpu_kernel")
        self.scheduler = Scheduler(self.config, self.pool)
        eos = set(model.config.eos_ids) | (set(tokenizer.eos_ids) if tokenizer else set())
        self.eos_ids = frozenset(eos)
        self.sampler = Sampler(model.config.vocab_size, eos_ids=self.eos_ids)
        self.requests: dict[str, Request] = {}
        self.num_computed_tokens = 0  # tokens run through the model, all requests
        self.num_draft_tokens = 0  # speculative tokens proposed / accepted
        self.num_accepted_tokens = 0
        self.num_preemptions = 0  # counters for /metrics
        self.num_failed_requests = 0
        self.texts: dict[str, TextState] = {}
        log.info("KV cache: %d blocks of %d tokens = %d tokens, %s", num_blocks,
                 self.config.block_size, self.capacity_tokens, cache.kv_dtype)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole KV pool holds."""
        return self.pool.num_blocks * self.config.block_size

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None, *, grammar: Grammar | None = None,
                    adapter_id: int = 0) -> str:
        """Validate and queue a request; raises RequestError before anything is allocated.

        With a grammar, every sampled token is masked to what it allows, and the request
        stops when the grammar's output is complete.
        """
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        prompt, max_tokens = self.check_request(prompt_ids, params)
        if len(self.scheduler.waiting) >= self.config.max_queue:
            raise RequestError("the waiting queue is full; retry later", code="queue_full")
        request = Request(request_id, prompt, params, max_tokens,
                          generator=make_generator(params.seed),
                          constraint=None if grammar is None else grammar.matcher(),
                          adapter_id=adapter_id)
        self.requests[request_id] = request
        if self.tokenizer is not None:
            self.texts[request_id] = TextState(self.tokenizer, prompt, params.stop,
                                               include_stop=params.include_stop_str_in_output)
        self.scheduler.add(request)
        return request_id

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams
                      ) -> tuple[list[int], int]:
        """(prompt ids, max tokens) of a request that fits this engine, else RequestError or
        ContextLengthError. Reads only the configuration: safe from any thread, so the
        server answers a request that can never run with a 400 even when the queue is full."""
        vocab_size = self.model.config.vocab_size
        prompt = check_prompt(prompt_ids, vocab_size)
        params.check_token_ids(vocab_size)
        context = min(self.config.max_model_len, self.model.config.max_seq_len)
        return prompt, resolve_max_tokens(len(prompt), params, context=context,
                                          capacity_tokens=self.capacity_tokens)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks (no-op if it already ended)."""
        request = self.requests.pop(request_id, None)
        self.texts.pop(request_id, None)
        if request is not None and not request.status.is_finished:
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)

    def step(self) -> list[StepOutput]:
        """One engine iteration: schedule -> run -> sample -> update."""
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        if not batch.requests:
            return []
        return self._run_batch(batch)

    def _run_batch(self, batch: Batch) -> list[StepOutput]:
        """Run and sample `batch`. A model step that raises is retried one request at a time,
        so that only the requests that fail alone end with an error."""
        try:
            logits, rows = self._forward(batch)
        except Exception as exc:
            if len(batch) == 1:
                log.exception("engine step failed for request %s", batch.requests[0].request_id)
                return self._fail(batch, f"internal error in the model step: {exc}")
            log.warning("a batch of %d failed its model step (%s): retrying them one by one",
                        len(batch), exc)
            return [out for request, num_new in zip(batch.requests, batch.num_new_tokens)
                    for out in self._run_batch(Batch((request,), (num_new,)))]
        return self._sample_and_update(batch, logits, rows)

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, list[int]]:
        """The runner on the whole batch, or (batch_invariant where the kernels are not) on
        each sequence alone, the logits joined in batch order."""
        if not self.split_batches or len(batch) == 1:
            return self.runner.run(batch)
        parts = [self.runner.run(Batch((request,), (num_new,)))
                 for request, num_new in zip(batch.requests, batch.num_new_tokens)]
        rows = [i for i, (_, part_rows) in enumerate(parts) for _ in part_rows]
        return torch.cat([part_logits for part_logits, _ in parts]), rows

    def _sample_and_update(self, batch: Batch, logits: torch.Tensor,
                           rows: list[int]) -> list[StepOutput]:
        outputs = []
        self._record_prompt_logprobs(batch)
        scored = {i for i, r in enumerate(batch.requests) if r.max_tokens == 0}
        rows = [-1 if i in scored else i for i in rows]  # prompt-only requests sample nothing
        failed = self._broken_rows(batch, logits, rows)
        for i, message in failed.items():
            outputs.append(self._finish_with_error(batch.requests[i], message))
        drafting = {i for i, r in enumerate(batch.requests) if r.draft_ids and i not in failed}
        accepted = verify_drafts(batch.requests, logits, rows, drafting,
                                 most=self.config.num_speculative_tokens)
        for i, kept in accepted.items():
            self.num_draft_tokens += len(batch.requests[i].draft_ids)
            self.num_accepted_tokens += len(kept) - 1
        for i, (request, num_new) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            if i not in failed:
                request.advance(num_new, len(accepted.get(i, [0])) - 1)
            self.num_computed_tokens += num_new
        plain = [j for j, i in enumerate(rows)
                 if i >= 0 and i not in drafting and i not in failed]
        if plain:
            outputs += self._sample_rows(batch, logits, rows, plain)
        for i, tokens in accepted.items():
            outputs.append(self._append_tokens(batch.requests[i], tokens))
        for i in scored:
            request = batch.requests[i]
            if request.num_computed_tokens >= request.num_prompt_tokens:
                outputs.append(self._finish_scored(request))
        for request in batch.requests:
            if not request.status.is_finished:
                self.scheduler.cache_computed_blocks(request)
        return outputs

    def _record_prompt_logprobs(self, batch: Batch) -> None:
        """Each prompt position computed this step scores the next prompt token (once: a
        preempted request recomputes positions it has already scored)."""
        for i, (start, log_probs) in self.runner.prompt_scores.items():
            batch.requests[i].record_prompt_logprobs(start, log_probs)

    def _finish_scored(self, request: Request) -> StepOutput:
        """A prompt-only request (max_tokens 0) ends once its prompt is computed."""
        self.scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
        self.requests.pop(request.request_id, None)
        self.texts.pop(request.request_id, None)
        return StepOutput(request.request_id, [], "", True, FinishReason.LENGTH,
                          request.num_prompt_tokens, 0,
                          prompt_logprobs=request.prompt_logprobs)

    def _broken_rows(self, batch: Batch, logits: torch.Tensor,
                     rows: list[int]) -> dict[int, str]:
        """Requests (by batch index) that cannot be sampled: NaN/inf logits (broken weights
        or activations) or a grammar matcher in an error state. Each fails alone."""
        failed: dict[int, str] = {}
        if rows:
            finite = torch.isfinite(logits).all(dim=-1).tolist()
            for j, ok in enumerate(finite):
                if not ok and rows[j] >= 0:
                    failed.setdefault(rows[j], "the model's logits are not finite (NaN or inf):"
                                               " its weights or activations are broken")
        for i in dict.fromkeys(i for i in rows if i >= 0):
            constraint = batch.requests[i].constraint
            if i not in failed and constraint is not None and constraint.error is not None:
                failed[i] = f"the grammar failed: {constraint.error}"
        return failed

    def _sample_rows(self, batch: Batch, logits: torch.Tensor, rows: list[int],
                     plain: list[int]) -> list[StepOutput]:
        """Sample the plain (non-drafting) rows together; if that raises, each alone, so that a
        request whose sampling fails (e.g. min_tokens banning all its grammar allows) fails
        by itself. Seeded generators are rewound first: neighbours draw what they would have."""
        requests = [batch.requests[rows[j]] for j in plain]
        states = [None if r.generator is None else r.generator.get_state() for r in requests]
        try:
            sampled = self._sample(requests, logits[plain] if len(plain) < len(rows) else logits)
        except Exception as exc:  # noqa: BLE001 - it ends the request(s), with the message
            if len(requests) == 1:
                return [self._finish_with_error(requests[0], f"sampling failed: {exc}")]
            for request, state in zip(requests, states):
                if state is not None:
                    request.generator.set_state(state)  # type: ignore[union-attr]
            return [out for j in plain for out in self._sample_rows(batch, logits, rows, [j])]
        return [self._append_token(request, sampled.token_ids[k], sampled.logprobs[k],
                                   sampled.top_logprobs[k]) for k, request in enumerate(requests)]

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> SamplerOutput:
        matchers = [r.constraint for r in requests]
        for r in requests:
            if r.params.has_penalties and r.token_counts is None:
                r.token_counts = TokenCounts(logits.shape[-1], r.prompt_ids, logits.device)
        return self.sampler(
            logits, [r.params for r in requests],
            prompt_ids=[r.prompt_ids for r in requests],
            output_ids=[r.output_ids for r in requests],
            generators=[r.generator for r in requests],
            allowed=fill_masks(matchers, logits.shape[-1]) if any(matchers) else None,
            counts=[r.token_counts for r in requests])

    def _append_tokens(self, request: Request, tokens: list[int]) -> StepOutput:
        """Append several greedy tokens, stopping at the first that ends the request."""
        merged: StepOutput | None = None
        for token in tokens:
            out = self._append_token(request, token, None, None)
            if merged is None:
                merged = out
            else:
                merged.new_token_ids += out.new_token_ids
                merged.new_text += out.new_text
                merged.logprobs += out.logprobs
                merged.top_logprobs += out.top_logprobs
                merged.finished, merged.finish_reason = out.finished, out.finish_reason
                merged.num_output_tokens = out.num_output_tokens
            if out.finished:
                break
        assert merged is not None
        return merged

    def _append_token(self, request: Request, token: int, logprob: float | None,
                      top: list[tuple[int, float]] | None) -> StepOutput:
        request.output_ids.append(token)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        params = request.params
        status: RequestStatus | None = None
        is_stop_token = (token in self.eos_ids and not params.ignore_eos) or \
            token in params.stop_token_ids
        text_state = self.texts.get(request.request_id)
        if is_stop_token:
            status = RequestStatus.FINISHED_STOPPED
        else:
            if request.constraint is not None:
                try:
                    request.constraint.consume(token)
                except MatcherError as e:  # a parser limit: fail this request, not the batch
                    request.error = str(e)
                else:
                    request.error = request.constraint.error  # stopped by an error, not done
                    if request.error is None and request.constraint.is_finished:
                        status = RequestStatus.FINISHED_STOPPED  # the constrained output is complete
                if request.error is not None:
                    status = RequestStatus.FINISHED_ERROR
                    self.num_failed_requests += 1
            if text_state is not None and text_state.add(token) and status is None:
                status = RequestStatus.FINISHED_STOPPED
        if status is None and len(request.output_ids) >= request.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        new_text = ""
        if text_state is not None:
            new_text = text_state.take(final=status is not None)
        if status is not None:
            self.scheduler.finish(request, status, error=request.error)
            self.requests.pop(request.request_id, None)
            self.texts.pop(request.request_id, None)
        first = len(request.output_ids) == 1 and params.prompt_logprobs is not None
        return StepOutput(
            request.request_id, [token], new_text, status is not None,
            None if status is None else status.finish_reason, request.num_prompt_tokens,
            len(request.output_ids), [logprob], [top], error=request.error,
            prompt_logprobs=request.prompt_logprobs if first else None)

    def _fail(self, batch: Batch, message: str) -> list[StepOutput]:
        return [self._finish_with_error(request, message) for request in batch.requests]

    def _finish_with_error(self, request: Request, message: str) -> StepOutput:
        """End one request with finish_reason "error"; its neighbours go on."""
        self.scheduler.finish(request, RequestStatus.FINISHED_ERROR, error=message)
        self.requests.pop(request.request_id, None)
        self.texts.pop(request.request_id, None)
        self.num_failed_requests += 1
        return StepOutput(request.request_id, [], "", True, FinishReason.ERROR,
                          request.num_prompt_tokens,
                          len(request.output_ids), error=message)

    def run_to_completion(self, request_ids: Iterable[str]) -> dict[str, list[StepOutput]]:
        """Step until the given requests finish; every StepOutput, grouped per request."""
        pending = set(request_ids)
        collected: dict[str, list[StepOutput]] = {rid: [] for rid in pending}
        while pending:
            if not self.has_work:
                raise RuntimeError(f"requests {sorted(pending)} vanished from the engine")
            for out in self.step():
                if out.request_id in collected:
                    collected[out.request_id].append(out)
                    if out.finished:
                        pending.discard(out.request_id)
        return collected
