"""Decode steps as CUDA graphs: one-token-per-sequence batches replayed from static tensors.

Why: a decode step of Mistral Small 3 is 40 layers of ~10 kernels each. At small batch the
GPU finishes each kernel faster than Python launches the next, so an eager step is bound by
launch overhead, not by HBM (vLLM, SGLang and gpt-fast capture their decode steps for this).
A graph replays a recorded sequence of kernels with fixed shapes at fixed addresses, so:
- a decode batch of n sequences is padded to the next captured size (1, 2, 4, 8, 16, 24, 32,
  48, ... up to max_num_seqs), one graph per size, captured on first use;
- its inputs are copied into static tensors: token ids, positions, KV slots, context lengths
  and block tables padded to the longest context (max_model_len);
- the graph holds the whole forward: embedding, every layer's KV write and FlexAttention
  over the pool (its block mask is built inside the graph from those tensors), and logits;
- padded rows read and write only a spare KV block that the block pool never hands out.

Eligible steps: every sequence brings one token (no prefill chunk, no speculative drafts, no
prompt logprobs) and no LoRA adapter set is loaded; every other step runs eagerly as before.

`mode="uncaptured"` runs the same padded static-tensor step without capturing it, on any
device: the CPU tests check it against the eager step, which is what a replay repeats.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from levante.engine.flex_attention import FlexKernel, build_flex_step
from levante.engine.kv_cache import KVCache
from levante.engine.paged_attention import PagedAttention
from levante.errors import ConfigError
from levante.model import Transformer

if TYPE_CHECKING:
    from levante.engine.scheduler import Batch

log = logging.getLogger(__name__)

GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def resolve_decode_graphs(requested: str, *, device: torch.device, attention_backend: str,
                          has_adapters: bool) -> str:
    """"captured", "uncaptured" or "off" for EngineConfig.decode_graphs `requested`; "on"
    where graphs cannot run is a ConfigError naming why."""
    problem = None
    if attention_backend != "flex":
        problem = f"they need the flex attention backend, this engine uses {attention_backend!r}"
    elif has_adapters:
        problem = "LoRA adapters switch per request, which a recorded graph cannot"
    if requested == "off" or (requested == "auto" and (device.type != "cuda" or problem)):
        return "off"
    if problem is not None:
        raise ConfigError(f"decode_graphs {requested!r}: {problem}")
    if requested == "on" and device.type != "cuda":
        raise ConfigError(f"decode_graphs 'on' needs a CUDA device, this engine runs on "
                          f"{device.type} ('uncaptured' runs the same step without a graph)")
    return "uncaptured" if requested == "uncaptured" else "captured"


class DecodeGraphs:
    """Static input tensors, and one captured graph (or plain call) per padded batch size."""

    def __init__(self, model: Transformer, cache: KVCache, flex: FlexKernel, *,
                 spare_block: int, max_num_seqs: int, max_model_len: int,
                 capture: bool) -> None:
        self.model, self.cache, self.flex, self.capture = model, cache, flex, capture
        self.sizes = [s for s in GRAPH_SIZES if s < max_num_seqs] + [max_num_seqs]
        self.spare_block = spare_block
        self.max_blocks = -(-max_model_len // cache.block_size)
        device = model.rope_cos.device
        largest = self.sizes[-1]
        self.ids, self.positions, self.slots = (
            torch.zeros(largest, dtype=torch.long, device=device) for _ in range(3))
        self.context_lens, self.query_lens = (
            torch.ones(largest, dtype=torch.long, device=device) for _ in range(2))
        self.tables = torch.zeros(largest, self.max_blocks, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.memory_pool = torch.cuda.graph_pool_handle() if capture else None
        self.steps = 0  # decode steps run through here

    @staticmethod
    def eligible(batch: Batch) -> bool:
        """Whether this step is a decode the graphs replay (see the module docstring)."""
        return all(n == 1 and not r.draft_ids and not r.scores_prompt
                   and r.num_computed_tokens == r.num_tokens - 1
                   for r, n in zip(batch.requests, batch.num_new_tokens))

    def fits(self, batch: Batch) -> bool:
        return len(batch) <= self.sizes[-1] and all(
            len(r.block_ids) <= self.max_blocks for r in batch.requests)

    def run(self, batch: Batch) -> tuple[torch.Tensor, list[int]]:
        """Logits [n, vocab] of the batch's n sequences (a copy), and their request indices."""
        n = len(batch)
        size = next(s for s in self.sizes if s >= n)
        self._load_inputs(batch, size)
        self.steps += 1
        if self.capture and size not in self.graphs:
            try:
                self.graphs[size] = self._record(size)
            except RuntimeError as e:  # the step still runs, eagerly; so do all after it
                log.warning("decode graphs: capturing batch size %d failed (%s); decode steps "
                            "run uncaptured from now on", size, e)
                self.capture = False
        if not self.capture:
            logits = self._forward(size)
        else:
            graph, logits = self.graphs[size]
            graph.replay()
        return logits[:n].clone(), list(range(n))

    def _load_inputs(self, batch: Batch, size: int) -> None:
        """Copy the step's inputs into the static tensors; rows n..size-1 get the spare block."""
        bs, spare = self.cache.block_size, self.spare_block
        n = len(batch)
        ids, positions, slots = [0] * size, [0] * size, [spare * bs] * size
        context_lens = [1] * size
        tables = torch.full((size, self.max_blocks), spare, dtype=torch.long)
        for row, request in enumerate(batch.requests):
            position = request.num_computed_tokens
            ids[row] = request.token_slice(position, position + 1)[0]
            positions[row] = position
            slots[row] = request.block_ids[position // bs] * bs + position % bs
            context_lens[row] = position + 1
            tables[row, :len(request.block_ids)] = torch.tensor(request.block_ids)
        for static, values in ((self.ids, ids), (self.positions, positions),
                               (self.slots, slots), (self.context_lens, context_lens)):
            static[:size].copy_(torch.tensor(values, dtype=torch.long), non_blocking=True)
        self.tables[:size].copy_(tables, non_blocking=True)
        assert n <= size

    def _forward(self, size: int) -> torch.Tensor:
        """The step on the static tensors' first `size` rows (what a graph records)."""
        tables, context_lens = self.tables[:size], self.context_lens[:size]
        query_lens = self.query_lens[:size]
        step = build_flex_step(self.flex, block_tables=tables, context_lens=context_lens,
                               query_lens=query_lens, num_blocks=self.cache.num_blocks,
                               block_size=self.cache.block_size, max_query_len=1)
        attention = PagedAttention(
            cache=self.cache, slot_mapping=self.slots[:size], block_tables=tables,
            context_lens=context_lens, query_lens=query_lens,
            context_len=self.max_blocks * self.cache.block_size, mask=None, query_index=None,
            num_seqs=size, max_query_len=1, use_cpu_kernel=False, flex=step)
        hidden = self.model(self.ids[:size], self.positions[:size], attention)
        return self.model.logits(hidden)

    def _record(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (FlexAttention compiles for this shape), then capture one step.

        The warm-up runs write this step's K/V at its slots, as the replay then does again:
        the same values at the same places.
        """
        log.info("decode graphs: capturing batch size %d", size)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(size)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory_pool):
            logits = self._forward(size)
        return graph, logits
