"""What LoRA training minimises: cross-entropy over the assistant tokens, and its held-out mean.

`token_loss` sums it over one batch's target tokens (the mask `levante.finetune.data` builds);
`evaluate` gives its mean per token over held-out examples, with the perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from levante.finetune.data import Example, collate
from levante.model import Transformer


def token_loss(model: Transformer, input_ids: torch.Tensor,
               target_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the masked target tokens, and their count.

    input_ids, target_mask: [B, S]. Position s predicts token s + 1, so only hidden states
    whose next token is a target go through the (vocab-wide) output head.
    """
    hidden = model(input_ids)  # [B, S, dim]
    wanted = target_mask[:, 1:]  # [B, S-1]
    logits = model.logits(hidden[:, :-1][wanted])  # [N, vocab] float32
    targets = input_ids[:, 1:][wanted]  # [N]
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


@dataclass(frozen=True)
class EvalResult:
    """Held-out loss (mean per target token) and its perplexity."""

    loss: float
    num_tokens: int

    @property
    def perplexity(self) -> float:
        """exp(loss)."""
        return math.exp(min(self.loss, 50.0))


@torch.no_grad()
def evaluate(model: Transformer, examples: Sequence[Example], *, batch_size: int,
             pad_id: int) -> EvalResult:
    """Mean loss over the assistant tokens of `examples` (dropout off)."""
    was_training = model.training
    model.eval()
    device = model.rope_cos.device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        ids, mask = collate(examples[start:start + batch_size], pad_id=pad_id)
        loss, n = token_loss(model, ids.to(device), mask.to(device))
        total, count = total + float(loss), count + n
    model.train(was_training)
    return EvalResult(total / max(count, 1), count)
