"""Request: one sequence's prompt, sampling parameters, outputs and lifecycle status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from levante.engine.sampling_params import SamplingParams
from levante.kinds import FinishReason


class RequestStatus(enum.Enum):
    """Where a request is in its life; the FINISHED_* values map to OpenAI's finish_reason."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED")

    @property
    def finish_reason(self) -> FinishReason | None:
        """OpenAI's finish_reason for a finished request, None while it runs."""
        return FinishReason(self.value) if self.is_finished else None


@dataclass
class Request:
    """A sequence in the engine: prompt + output token ids, and how far its KV is computed."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved output budget (params.max_tokens or what the context allows)
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    error: str | None = None
    constraint: Any = None  # a grammar matcher (levante.structured) while output is constrained
    adapter_id: int = 0  # LoRA adapter serving this request (0 = the base model)
    first_token_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (not recomputed)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks, in order
    num_registered_blocks: int = 0  # leading blocks of block_ids known to the prefix cache
    draft_ids: list[int] = field(default_factory=list)  # speculative tokens for this step
    ngrams: Any = None  # prompt-lookup's NgramIndex (drafts.py), built at the first draft
    # (token id, its logprob, top alternatives) per prompt position from 1, as computed
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(
        default_factory=list)
    num_drafts: int | None = None  # draft length this request now uses (None: the maximum)
    draft_pause: int = 0  # decode steps left without drafting, after drafts that all failed
    token_counts: Any = None  # penalties' running TokenCounts (sampler), built when first used

    # State transitions: the scheduler owns the block pool and the queues, the request its
    # own counters, drafts and hashes; each change of state is one of these methods.

    def start_running(self) -> None:
        """Admitted: waiting -> running (drafts are proposed afresh each step)."""
        self.status = RequestStatus.RUNNING
        self.draft_ids = []

    def preempt(self) -> None:
        """running -> waiting with no KV: recomputed from token 0 when readmitted. Its block
        hashes stay (they are of its tokens); its blocks were given back by the caller."""
        self.status = RequestStatus.WAITING
        self.block_ids = []
        self.num_computed_tokens = 0
        self.num_registered_blocks = 0
        self.draft_ids = []
        self.num_preemptions += 1

    def advance(self, num_new: int, num_accepted_drafts: int) -> None:
        """A step computed `num_new` rows of K/V: the last `len(draft_ids)` are drafts, of
        which only the accepted ones count (the rest is overwritten later)."""
        self.num_computed_tokens += num_new - len(self.draft_ids) + num_accepted_drafts
        self.draft_ids = []

    def record_drafts(self, num_drafted: int, num_accepted: int, most: int) -> None:
        """Adapt the draft length to how this request's drafts fare (lossless at any length:
        only the cost changes): all accepted -> one more, up to `most`; some -> one past the
        accepted run; none -> half, and at zero a pause of 8 steps before trying 1 again.
        Rejected drafts are rows computed for nothing; a batch pays for every one."""
        if num_accepted == num_drafted:
            self.num_drafts = min(most, num_drafted + 1)
        elif num_accepted > 0:
            self.num_drafts = num_accepted + 1
        else:
            self.num_drafts = num_drafted // 2
            if self.num_drafts == 0:
                self.num_drafts, self.draft_pause = 1, 8

    def record_prompt_logprobs(self, start: int, log_probs: torch.Tensor) -> None:
        """Prompt positions `start ..` were computed, `log_probs` [N, V] their next-token
        distributions: each scores the next prompt token, once (a preempted request
        recomputes positions it has already scored)."""
        k = self.params.prompt_logprobs or 0
        done = len(self.prompt_logprobs)  # positions 0 .. done - 1 are scored
        if start + len(log_probs) <= done:
            return
        fresh = log_probs[done - start:] if done > start else log_probs
        first = max(start, done)
        targets = torch.tensor(self.prompt_ids[first + 1:first + 1 + len(fresh)],
                               device=fresh.device)
        chosen = fresh.gather(1, targets[:, None]).squeeze(1).tolist()
        top_values, top_ids = fresh.topk(k, dim=-1) if k else (fresh[:, :0], fresh[:, :0])
        for token, value, ids, values in zip(targets.tolist(), chosen, top_ids.tolist(),
                                             top_values.tolist()):
            self.prompt_logprobs.append((token, value, list(zip(ids, values))))

    def finish(self, status: RequestStatus, error: str | None = None) -> None:
        """running or waiting -> finished; the caller frees its blocks."""
        self.status = status
        if error is not None:
            self.error = error
        self.block_ids = []
        self.draft_ids = []

    @property
    def num_known_full_blocks_limit(self) -> int:
        """Tokens that may be hashed into prefix-cache blocks: computed and known (an
        accepted draft's K/V is computed a step before its token is appended)."""
        return min(self.num_computed_tokens, self.num_tokens)

    @property
    def scores_prompt(self) -> bool:
        """Whether each prompt position's logits are turned into prompt logprobs."""
        return self.params.prompt_logprobs is not None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_id(self, index: int) -> int:
        """Token at position `index` of prompt + output."""
        n = len(self.prompt_ids)
        return self.prompt_ids[index] if index < n else self.output_ids[index - n]

    @property
    def can_speculate(self) -> bool:
        """Greedy with nothing that reshapes the logits: argmax verification is exact."""
        p = self.params
        return (p.is_greedy and not p.has_penalties and not p.logit_bias and p.logprobs is None
                and p.min_tokens == 0 and self.constraint is None)

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens at positions [start, stop) of prompt + output, without concatenating all."""
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n:stop - n]
        return self.prompt_ids[start:] + self.output_ids[:stop - n]
