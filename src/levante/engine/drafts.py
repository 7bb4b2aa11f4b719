"""Prompt-lookup speculative decoding: drafts from a request's own n-grams, checked greedily."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from levante.engine.request import Request


def verify_drafts(requests: Sequence[Request], logits: torch.Tensor, rows: list[int],
                  drafting: set[int], *, most: int) -> dict[int, list[int]]:
    """Greedy tokens each drafting request (by batch index) keeps: accepted drafts plus
    one more; each request records how its drafts fared (`most`: the longest draft).

    Row j of a request's rows is the model's choice after draft j - 1; drafts are kept
    while they equal those choices, so outputs equal plain greedy decoding.
    """
    kept: dict[int, list[int]] = {}
    spec = [j for j, i in enumerate(rows) if i in drafting]
    if not spec:
        return kept
    choices = logits[spec].argmax(dim=-1).tolist()
    cursor = 0
    for i in dict.fromkeys(rows[j] for j in spec):
        drafts = requests[i].draft_ids
        targets = choices[cursor:cursor + len(drafts) + 1]
        cursor += len(drafts) + 1
        n = 0
        while n < len(drafts) and drafts[n] == targets[n]:
            n += 1
        kept[i] = drafts[:n] + [targets[n]]
        requests[i].record_drafts(len(drafts), n, most)
    return kept


class NgramIndex:
    """Where each n-gram (n <= max_n) of a request's tokens last ended, kept up to date as
    tokens arrive: a step costs O(new tokens), not a scan of the whole context (~25 ms a step
    at 32K in Python).

    Example, n-gram 2: tokens [5, 6, 7, 9, 5, 6] end in (5, 6), which last ended earlier at
    position 2, followed by [7, 9, 5, 6]: the drafts are those, up to k.
    """

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self.last_end: dict[tuple[int, ...], int] = {}
        self.num_indexed = 1  # n-grams ending (exclusive) before this position are indexed

    def propose(self, request: Request, k: int) -> list[int]:
        num_tokens = request.num_tokens
        # Index every n-gram that ends before the last token: the tail itself must not match.
        if self.num_indexed < num_tokens:
            first = max(0, self.num_indexed - self.max_n)
            window = request.token_slice(first, num_tokens - 1)
            for end in range(self.num_indexed, num_tokens):
                local = end - first
                for n in range(1, min(self.max_n, end) + 1):
                    self.last_end[tuple(window[local - n:local])] = end
            self.num_indexed = num_tokens
        tail = request.token_slice(max(0, num_tokens - self.max_n), num_tokens)
        for n in range(min(self.max_n, num_tokens - 1), 0, -1):
            found = self.last_end.get(tuple(tail[-n:]))
            if found is not None:
                return request.token_slice(found, min(found + k, num_tokens))
        return []
