"""ModelRunner: turns a scheduled Batch into model inputs, runs the model, returns logits."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from levante.engine import flex_attention
from levante.engine.cuda_graphs import DecodeGraphs, resolve_decode_graphs
from levante.engine.flex_attention import FlexKernel
from levante.engine.kv_cache import KVCache
from levante.engine.paged_attention import build_paged_attention
from levante.engine.scheduler import Batch
from levante.errors import ConfigError
from levante.model import Transformer
from levante.quant import kernels

if TYPE_CHECKING:
    from levante.finetune.adapters import AdapterSet


log = logging.getLogger(__name__)

ATTENTION_LOG = {
    "cpu_kernel": "the compiled CPU paged kernel (reads the pool in place)",
    "sdpa": "SDPA over each sequence's blocks, gathered per layer",
    "flex": "FlexAttention over the paged pool through a block mask ({compiled})",
}


def resolve_attention_backend(requested: str, model: Transformer, cache: KVCache) -> str:
    """The backend `requested` ("auto" or a name, see EngineConfig) means for this model and
    pool: "cpu_kernel", "sdpa" or "flex"; a forced one that cannot run is a ConfigError."""
    device = model.rope_cos.device.type
    dtype = model.model.embed_tokens.weight.dtype
    cpu_kernel_runs = device == "cpu" and dtype == torch.float32 and kernels.available()
    flex_problem = flex_attention.unsupported_reason(
        device_type=device, block_size=cache.block_size, kv_dtype=cache.kv_dtype,
        activation_dtype=dtype)
    if requested == "auto":
        if cpu_kernel_runs:
            return "cpu_kernel"
        if device == "cuda" and flex_problem is None:
            return "flex"
        if device == "cuda":
            log.info("attention: not FlexAttention: %s", flex_problem)
        return "sdpa"
    if requested == "cpu_kernel" and not cpu_kernel_runs:
        raise ConfigError(f"attention_backend 'cpu_kernel' needs float32 activations on the CPU "
                          f"with the compiled kernels; this model is {dtype} on {device}"
                          f"{'' if kernels.available() else ', and the kernels did not build'}")
    if requested == "flex" and flex_problem is not None:
        raise ConfigError(f"attention_backend 'flex' cannot run: {flex_problem}")
    return requested


class ModelRunner:
    """Owns the model and the KV cache; one `run` per engine step."""

    def __init__(self, model: Transformer, cache: KVCache, *,
                 adapters: AdapterSet | None = None, attention_backend: str = "auto",
                 decode_graphs: str = "off", max_num_seqs: int = 1,
                 max_model_len: int | None = None) -> None:
        """decode_graphs other than "off" (EngineConfig.decode_graphs) needs the cache's last
        block kept out of the block pool: padded graph rows use it."""
        self.model = model
        self.cache = cache
        self.adapters = adapters
        self.device = model.rope_cos.device
        self.attention_backend = resolve_attention_backend(attention_backend, model, cache)
        self.flex = FlexKernel.for_device(self.device) if self.attention_backend == "flex" else None
        compiled = "compiled" if self.flex is not None and self.flex.is_compiled else "eager"
        log.info("attention: %s", ATTENTION_LOG[self.attention_backend].format(compiled=compiled))
        graphs = resolve_decode_graphs(decode_graphs, device=self.device,
                                       attention_backend=self.attention_backend,
                                       has_adapters=adapters is not None)
        self.graphs = None
        if graphs != "off" and self.flex is not None:
            self.graphs = DecodeGraphs(
                model, cache, self.flex, spare_block=cache.num_blocks - 1,
                max_num_seqs=max_num_seqs, max_model_len=max_model_len or model.config.max_seq_len,
                capture=graphs == "captured")
            log.info("decode steps: %s", "CUDA graphs" if graphs == "captured"
                     else "static padded inputs, not captured")

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor, list[int]]:
        """Compute the batch; logits for the requests that reach their last known token.

        A request with speculative drafts gets 1 + len(drafts) rows (its last token's and each
        draft's); others one. Returns logits [rows, vocab] and each row's request index.
        A request that asks for prompt logprobs gets its prompt positions' log-softmax in
        `self.prompt_scores` (batch index -> (first position, [n, vocab] float32)).
        """
        self.prompt_scores: dict[int, tuple[int, torch.Tensor]] = {}
        if self.graphs is not None and self.graphs.eligible(batch) and self.graphs.fits(batch):
            return self.graphs.run(batch)
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
            context_lens=context_lens, query_lens=list(batch.num_new_tokens), device=self.device,
            use_cpu_kernel=self.attention_backend == "cpu_kernel", flex=self.flex)
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
