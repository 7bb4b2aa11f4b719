"""Logit bias and repetition/presence/frequency penalties, with their running token counts."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from levante.engine.sampling_params import SamplingParams


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Add each row's logit_bias to its logits, in place."""
    rows = [row for row, p in enumerate(params) for _ in p.logit_bias]
    if not rows:
        return
    token_ids = [token_id for p in params for token_id, _ in p.logit_bias]
    biases = torch.tensor([bias for p in params for _, bias in p.logit_bias], device=logits.device)
    logits.index_put_((_long(rows, logits.device), _long(token_ids, logits.device)), biases,
                      accumulate=True)


class TokenCounts:
    """One request's running counts for penalties: how often each token is in its output,
    and which are in its prompt. `sync` adds only the tokens appended since the last call,
    so a step costs O(new tokens), not a recount of the whole output."""

    def __init__(self, vocab_size: int, prompt_ids: Sequence[int], device: torch.device) -> None:
        self.output = torch.zeros(vocab_size, device=device)
        self.in_prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.in_prompt[_long(list(prompt_ids), device)] = True
        self.num_counted = 0

    def sync(self, output_ids: Sequence[int]) -> TokenCounts:
        new = output_ids[self.num_counted:]
        if new:
            index = _long(list(new), self.output.device)
            self.output.index_put_((index,), torch.ones(len(new), device=self.output.device),
                                   accumulate=True)
            self.num_counted = len(output_ids)
        return self


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                     prompt_ids: Sequence[Sequence[int]],
                     output_ids: Sequence[Sequence[int]],
                     counts: Sequence[TokenCounts | None] | None = None) -> None:
    """Repetition (transformers), then presence and frequency (OpenAI), in place. `counts`
    (running, per row) replaces counting `prompt_ids`/`output_ids` where given."""
    rows = [row for row, p in enumerate(params) if p.has_penalties]
    if not rows:
        return
    device = logits.device
    if counts is not None and all(counts[row] is not None for row in rows):
        output_counts = torch.zeros(logits.shape, device=device)
        prompt_seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        for row in rows:
            row_counts = counts[row].sync(output_ids[row])  # type: ignore[union-attr]
            output_counts[row] = row_counts.output
            prompt_seen[row] = row_counts.in_prompt
    else:
        output_counts = _count_tokens(output_ids, rows, logits.shape, device)  # [B, V]
        prompt_seen = None
    if any(params[row].repetition_penalty != 1.0 for row in rows):
        if prompt_seen is None:
            prompt_seen = _count_tokens(prompt_ids, rows, logits.shape, device) > 0
        seen = prompt_seen | (output_counts > 0)
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits.copy_(torch.where(seen, penalized, logits))
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    logits -= output_counts * frequency + (output_counts > 0) * presence


def _count_tokens(id_lists: Sequence[Sequence[int]], rows: list[int], shape: torch.Size,
                  device: torch.device) -> torch.Tensor:
    """[B, V] float32: how often each token id occurs in id_lists[row], for `rows` (others 0)."""
    counts = torch.zeros(shape, device=device)
    lengths = [len(id_lists[row]) for row in rows]
    if sum(lengths):
        row_index = torch.repeat_interleave(_long(rows, device), _long(lengths, device))
        token_index = _long(list(itertools.chain.from_iterable(id_lists[row] for row in rows)),
                            device)
        counts.index_put_((row_index, token_index), torch.ones(len(token_index), device=device),
                          accumulate=True)
    return counts


def _long(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
