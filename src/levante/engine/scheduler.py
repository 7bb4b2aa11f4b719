"""Scheduler: continuous batching with chunked prefill and preemption over the block pool."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from levante.config import EngineConfig
from levante.engine.drafts import NgramIndex
from levante.engine.kv_blocks import BlockPool, block_hash
from levante.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class Batch:
    """What the runner computes this step: `num_new_tokens[i]` tokens of `requests[i]`."""

    requests: tuple[Request, ...]
    num_new_tokens: tuple[int, ...]
    preempted: tuple[Request, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    """Decides each step which requests run and how many of their tokens, vLLM-v1 style.

    A request's next tokens are `num_tokens - num_computed_tokens`: the whole prompt (or a
    chunk of it) at first, one token per step once decoding, or everything again after a
    preemption. Running requests go first (oldest first), then waiting ones are admitted
    while the token budget, the sequence limit and free blocks allow.
    """

    def __init__(self, config: EngineConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_prefix_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hit_tokens = 0  # of which found there (vLLM's prefix_cache_* pair)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        """Mark finished, free its blocks (its computed full blocks stay in the prefix cache,
        unless it failed) and drop it from whichever queue holds it."""
        if error is None:
            self.cache_computed_blocks(request)
        else:  # its K/V may be broken: nobody else may reuse the blocks it registered
            first_own = request.num_cached_tokens // self.config.block_size  # hits: not its
            for i in range(first_own, min(request.num_registered_blocks, len(request.block_ids))):
                self.pool.unregister(request.block_ids[i], request.block_hashes[i])
        self.pool.free(request.block_ids)
        request.finish(status, error)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def schedule(self) -> Batch:
        """Pick this step's work; may preempt the youngest running requests to free blocks."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[Request] = []
        counts: list[int] = []
        preempted: list[Request] = []
        speculate = len(self.running) <= self.config.speculative_max_batch
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            request.draft_ids = self._drafts(request, budget) if num_new == 1 and speculate \
                else []
            assert not request.draft_ids or num_new == 1
            num_new += len(request.draft_ids)
            while not self._grow(request, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                scheduled.append(request)
                counts.append(num_new)
                budget -= num_new
                self._register_scheduled(request, num_new)
        if not preempted:
            budget = self._admit(scheduled, counts, budget)
        return Batch(tuple(scheduled), tuple(counts), tuple(preempted))

    def _drafts(self, request: Request, budget: int) -> list[int]:
        """Prompt-lookup drafts: what followed the last earlier occurrence of the latest n-gram
        (longest first, up to `speculative_ngram`), from the request's `NgramIndex`."""
        if request.draft_pause > 0:
            request.draft_pause -= 1
            return []
        most = self.config.num_speculative_tokens
        k = min(most if request.num_drafts is None else request.num_drafts, budget - 1,
                request.max_tokens - len(request.output_ids) - 1)
        if k <= 0 or not request.can_speculate:
            return []
        if request.ngrams is None:
            request.ngrams = NgramIndex(self.config.speculative_ngram)
        return request.ngrams.propose(request, k)

    def _admit(self, scheduled: list[Request], counts: list[int], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.num_computed_tokens == 0:
                self._take_cached_prefix(request)
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._grow(request, num_new):
                self._release(request)
                break
            self.waiting.popleft()
            request.start_running()
            self.running.append(request)
            scheduled.append(request)
            counts.append(num_new)
            budget -= num_new
            self._register_scheduled(request, num_new)
        return budget

    def _register_scheduled(self, request: Request, num_new: int) -> None:
        """Put the blocks this step fills with known tokens in the prefix cache now, not after
        the step: a request admitted later in the same step (the other choices of n > 1, the
        same prompt sent twice) then shares them instead of computing them again. Each layer
        writes the whole batch's K/V before any row attends, so the sharer reads them filled.
        A request that fails takes its registrations back (`finish`)."""
        if not self.pool.enable_caching:
            return
        limit = min(request.num_computed_tokens + num_new - len(request.draft_ids),
                    request.num_tokens)
        self.hash_blocks(request, limit=limit)
        num_full = limit // self.config.block_size
        for i in range(request.num_registered_blocks, num_full):
            self.pool.register(request.block_ids[i], request.block_hashes[i])
        request.num_registered_blocks = max(request.num_registered_blocks, num_full)

    def _grow(self, request: Request, num_new: int) -> bool:
        """Ensure blocks for `num_computed + num_new` tokens; False if the pool is short."""
        needed = -(-(request.num_computed_tokens + num_new) // self.config.block_size)
        missing = needed - len(request.block_ids)
        if missing <= 0:
            return True
        blocks = self.pool.allocate(missing)
        if blocks is None:
            return False
        request.block_ids.extend(blocks)
        return True

    def _take_cached_prefix(self, request: Request) -> None:
        """Reuse cached blocks for the request's leading full blocks (one token stays to run)."""
        if not self.pool.enable_caching or request.params.prompt_logprobs is not None:
            return  # (prompt logprobs need every prompt position computed)
        self.hash_blocks(request, limit=request.num_tokens - 1)
        hits = self.pool.lookup(request.block_hashes)
        request.block_ids = hits
        request.num_computed_tokens = len(hits) * self.config.block_size
        request.num_cached_tokens = request.num_computed_tokens
        request.num_registered_blocks = len(hits)
        self.num_prefix_queried_tokens += request.num_tokens
        self.num_prefix_hit_tokens += request.num_computed_tokens

    def _release(self, request: Request) -> None:
        """Give back blocks taken at a failed admission."""
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.num_cached_tokens = 0
        request.num_registered_blocks = 0

    def hash_blocks(self, request: Request, *, limit: int) -> None:
        """Extend `request.block_hashes` over its full blocks within the first `limit` tokens."""
        size = self.config.block_size
        # KV computed under a LoRA adapter differs from the base's: the adapter seeds the chain.
        seed = request.adapter_id.to_bytes(8, "little") if request.adapter_id else None
        for i in range(len(request.block_hashes), limit // size):
            parent = request.block_hashes[-1] if request.block_hashes else seed
            tokens = request.token_slice(i * size, (i + 1) * size)
            assert len(tokens) == size, "a block hash over tokens the request does not have yet"
            request.block_hashes.append(block_hash(parent, tokens))

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's newly full, computed blocks in the prefix cache."""
        if not self.pool.enable_caching:
            return
        limit = request.num_known_full_blocks_limit
        self.hash_blocks(request, limit=limit)
        num_full = limit // self.config.block_size  # hashes may run ahead (prompt lookups)
        for i in range(request.num_registered_blocks, num_full):
            self.pool.register(request.block_ids[i], request.block_hashes[i])
        request.num_registered_blocks = max(request.num_registered_blocks, num_full)

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks and put it first in line to be recomputed."""
        self.running.remove(request)
        self.pool.free(request.block_ids)
        request.preempt()
        self.waiting.appendleft(request)
