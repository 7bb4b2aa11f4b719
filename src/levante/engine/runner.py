"""ModelRunner: turns a scheduled Batch into model inputs, runs the model, returns logits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from levante.engine.kv_cache import KVCache, build_paged_attention
from levante.engine.scheduler import Batch
from levante.model import Transformer

if TYPE_CHECKING:
    from levante.finetune.adapters import AdapterSet


class ModelRunner:
    """Owns the model and the KV cache; one `run` per engine step."""

    def __init__(self, model: Transformer, cache: KVCache, *,
                 adapters: AdapterSet | None = None) -> None:
        self.model = model
        self.cache = cache
        self.adapters = adapters
        self.device = model.rope_cos.device

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor, list[int]]:
        """Compute the batch; logits for the requests that reach their last known token.

        A request with speculative drafts gets 1 + len(drafts) rows (its last token's and each
        draft's); others one. Returns logits [rows, vocab] and each row's request index.
        A request that asks for prompt logprobs gets its prompt positions' log-softmax in
        `self.prompt_scores` (batch index -> (first position, [n, vocab] float32)).
        """
        self.prompt_scores: dict[int, tuple[int, torch.Tensor]] = {}
        token_ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []  # row of the last new token, per sampling request
        sample_requests: list[int] = []
        for i, (request, num_new) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start = request.num_computed_tokens
            end = start + num_new
            drafts = request.draft_ids
            token_ids.extend(request.token_slice(start, end - len(drafts)) + drafts)
            positions.extend(range(start, end))
            context_lens.append(end)
            if end - len(drafts) == request.num_tokens:
                first_row = len(token_ids) - 1 - len(drafts)
                sample_rows.extend(range(first_row, len(token_ids)))
                sample_requests.extend([i] * (1 + len(drafts)))
        attention = build_paged_attention(
            self.cache, block_tables=[r.block_ids for r in batch.requests],
            context_lens=context_lens, query_lens=list(batch.num_new_tokens), device=self.device)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        if self.adapters is not None:
            self.adapters.set_batch([r.adapter_id for r in batch.requests], batch.num_new_tokens)
        hidden = self.model(ids, pos, attention)
        offset = 0
        for i, (request, num_new) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start = request.num_computed_tokens
            # position p's logits score prompt token p + 1
            stop = min(start + num_new, request.num_prompt_tokens - 1)
            if request.scores_prompt and stop > start:
                rows_i = hidden[offset:offset + stop - start]
                self.prompt_scores[i] = (start, self.model.logits(rows_i).log_softmax(dim=-1))
            offset += num_new
        if not sample_rows:
            return hidden.new_empty(0, self.model.config.vocab_size), []
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.logits(hidden[rows]), sample_requests
