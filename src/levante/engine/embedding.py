"""Sequence embeddings of a generative model: the final-norm hidden state of the last token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from levante.model import Transformer

if TYPE_CHECKING:
    from levante.finetune.adapters import AdapterSet


@torch.inference_mode()
def embed_prompts(model: Transformer, prompts: Sequence[Sequence[int]], *,
                  adapters: AdapterSet | None = None, adapter_id: int = 0) -> torch.Tensor:
    """One vector per prompt: [len(prompts), dim] float32, not normalized.

    Last-token pooling, what llama.cpp computes for a decoder LM whose GGUF names no
    `pooling_type` (pooling NONE: Ollama's runner takes the prompt's last row of the
    embeddings output, `result_norm`). Each prompt runs alone and unpadded (no KV cache,
    plain causal attention), so a prompt's vector never depends on the others in the call.
    The engine thread calls this between steps (AsyncEngine.embed): the running requests'
    KV blocks are untouched.
    """
    device = model.rope_cos.device
    vectors = []
    for prompt_ids in prompts:
        assert prompt_ids, "an empty prompt has no last token"
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # [1, S]
        if adapters is not None:
            adapters.set_token_adapters(torch.full_like(ids, adapter_id))
        try:
            hidden = model(ids)  # [1, S, dim], after the final norm
        finally:
            if adapters is not None:
                adapters.clear()
        vectors.append(hidden[0, -1].float().cpu())
    return torch.stack(vectors) if vectors else torch.empty(0, model.config.dim)
