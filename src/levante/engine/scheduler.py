"""Scheduler: continuous batching with chunked prefill and preemption over the block pool."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from levante.config import EngineConfig
from levante.engine.kv_cache import BlockPool, block_hash
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

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished, free its blocks and drop it from whichever queue holds it."""
        request.status = status
        self.pool.free(request.block_ids)
        request.block_ids = []
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
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            request.draft_ids = self._drafts(request, budget) if num_new == 1 else []
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
        if not preempted:
            budget = self._admit(scheduled, counts, budget)
        return Batch(tuple(scheduled), tuple(counts), tuple(preempted))

    def _drafts(self, request: Request, budget: int) -> list[int]:
        """Prompt-lookup drafts: what followed the last earlier occurrence of the latest n-gram.

        Example, n-gram 2: tokens [5, 6, 7, 9, 5, 6] end in (5, 6), seen at 0, followed by
        [7, 9, ...], so the drafts are [7, 9, 5, 6][:k].
        """
        k = min(self.config.num_speculative_tokens, budget - 1,
                request.max_tokens - len(request.output_ids) - 1)
        if k <= 0 or not request.can_speculate:
            return []
        tokens = request.token_slice(0, request.num_tokens)
        for n in range(min(self.config.speculative_ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k]
        return []

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
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(request)
            counts.append(num_new)
            budget -= num_new
        return budget

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
        if not self.pool.enable_caching:
            return
        self.hash_blocks(request, limit=request.num_tokens - 1)
        hits = self.pool.lookup(request.block_hashes)
        request.block_ids = hits
        request.num_computed_tokens = len(hits) * self.config.block_size
        request.num_cached_tokens = request.num_computed_tokens
        request.num_registered_blocks = len(hits)

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
            request.block_hashes.append(
                block_hash(parent, request.token_slice(i * size, (i + 1) * size)))

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's newly full, computed blocks in the prefix cache."""
        if not self.pool.enable_caching:
            return
        self.hash_blocks(request, limit=request.num_computed_tokens)
        num_full = request.num_computed_tokens // self.config.block_size
        for i in range(request.num_registered_blocks, num_full):
            self.pool.register(request.block_ids[i], request.block_hashes[i])
        request.num_registered_blocks = max(request.num_registered_blocks, num_full)

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks and put it first in line to be recomputed."""
        self.running.remove(request)
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.num_registered_blocks = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
