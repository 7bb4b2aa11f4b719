"""Sequence embeddings of a generative model: final-norm hidden states pooled, a chunk at a time."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from levante.engine.paged_attention import build_paged_attention
from levante.errors import RequestError

if TYPE_CHECKING:
    from levante.engine.engine import Engine


class Pooling(enum.Enum):
    """How a prompt's final-norm hidden states [S, dim] become one vector [dim]."""

    MEAN = "mean"  # the average over all S rows: llama.cpp's `--embeddings --pooling mean`
    CLS = "cls"  # the first row
    LAST = "last"  # the last row: Ollama 0.12's runner for a GGUF without a pooling type


# llama.cpp's `<arch>.pooling_type` (enum llama_pooling_type) -> Pooling. NONE (0) returns every
# row; Ollama's runner then answers with the last one, as LAST (3). RANK (4), a reranker's
# classifier head, has no entry.
GGUF_POOLING = {0: Pooling.LAST, 1: Pooling.MEAN, 2: Pooling.CLS, 3: Pooling.LAST}


class EmbeddingJob:
    """Prompts embedded `chunk_tokens` at a time between engine steps, each over KV blocks
    borrowed from the engine's pool for its duration.

    A chunk is the model's own paged-attention prefill of the prompt's next tokens, so a long
    input costs the running streams one chunk's time per step, not its whole forward; the
    result equals the unchunked prefill's (the mean sums in float64). Worked example,
    chunk_tokens 512, prompts of 1200 and 3 tokens: steps compute [0, 512), [512, 1024),
    [1024, 1200) of the first (its blocks freed after the last), then the second whole.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], *, pooling: Pooling,
                 chunk_tokens: int, adapter_id: int = 0) -> None:
        assert chunk_tokens > 0 and all(prompts), "empty prompts have nothing to pool"
        self.prompts = [list(p) for p in prompts]
        self.pooling = pooling
        self.chunk_tokens = chunk_tokens
        self.adapter_id = adapter_id
        self.vectors: list[torch.Tensor] = []  # one [dim] float32 per finished prompt
        self.block_ids: list[int] = []  # borrowed for the current prompt
        self.num_computed = 0  # tokens of the current prompt run so far
        self._pooled: torch.Tensor | None = None  # running sum (MEAN, float64) or row

    @property
    def is_done(self) -> bool:
        return len(self.vectors) == len(self.prompts)

    def result(self, dim: int) -> torch.Tensor:
        """[len(prompts), dim] float32 on the CPU, not normalized."""
        return torch.stack(self.vectors) if self.vectors else torch.empty(0, dim)

    @torch.inference_mode()
    def advance(self, engine: Engine) -> bool:
        """Run the next chunk. False (nothing done) while the pool lacks the blocks the
        current prompt needs: running requests hold them; try again after a step."""
        assert not self.is_done
        prompt = self.prompts[len(self.vectors)]
        if not self.block_ids and not self._borrow(engine, len(prompt)):
            return False
        start = self.num_computed
        end = min(start + self.chunk_tokens, len(prompt))
        runner = engine.runner
        attention = build_paged_attention(
            runner.cache, block_tables=[self.block_ids], context_lens=[end],
            query_lens=[end - start], device=runner.device)
        ids = torch.tensor(prompt[start:end], dtype=torch.long, device=runner.device)
        positions = torch.arange(start, end, device=runner.device)
        if runner.adapters is not None:
            runner.adapters.set_batch([self.adapter_id], [end - start])
        hidden = runner.model(ids, positions, attention)  # [end - start, dim], final norm
        self._pool(hidden, start=start, is_last=end == len(prompt))
        self.num_computed = end
        if end == len(prompt):
            assert self._pooled is not None
            vector = self._pooled / len(prompt) if self.pooling is Pooling.MEAN else self._pooled
            self.vectors.append(vector.float().cpu())
            self.release(engine)
        return True

    def release(self, engine: Engine) -> None:
        """Give the borrowed blocks back (after each prompt, or when the job is dropped)."""
        engine.pool.free(self.block_ids)
        self.block_ids = []
        self.num_computed = 0
        self._pooled = None

    def _borrow(self, engine: Engine, num_tokens: int) -> bool:
        num_blocks = -(-num_tokens // engine.config.block_size)
        if num_blocks > engine.pool.num_blocks:
            raise RequestError(f"an input of {num_tokens} tokens needs {num_blocks} KV blocks; "
                               f"the pool has {engine.pool.num_blocks}", param="input")
        blocks = engine.pool.allocate(num_blocks)
        if blocks is None:
            return False
        self.block_ids = blocks
        return True

    def _pool(self, hidden: torch.Tensor, *, start: int, is_last: bool) -> None:
        if self.pooling is Pooling.MEAN:
            chunk_sum = hidden.double().sum(dim=0)  # [dim]
            self._pooled = chunk_sum if self._pooled is None else self._pooled + chunk_sum
        elif self.pooling is Pooling.CLS and start == 0:
            self._pooled = hidden[0].clone()
        elif self.pooling is Pooling.LAST and is_last:
            self._pooled = hidden[-1].clone()
