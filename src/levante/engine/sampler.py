"""The batched sampler: masks, min_tokens, greedy/temperature/top-k/top-p/min-p, seeds, logprobs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from levante.engine.penalties import TokenCounts, apply_logit_bias, apply_penalties
from levante.engine.sampling_params import SamplingParams
from levante.errors import RequestError

NUM_CANDIDATES = 256  # top-k/top-p look at this many most likely tokens first


@dataclass
class SamplerOutput:
    """One sampled token per batch row, with its logprob and top alternatives when asked for."""

    token_ids: list[int]
    logprobs: list[float | None]  # None where the row's params.logprobs is None
    top_logprobs: list[list[tuple[int, float]] | None]  # (token_id, logprob), most likely first


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The generator a seeded request owns for its whole life; None for an unseeded request."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Picks the next token for every row of a [B, V] logits batch, each row by its own params.

    Order, as in vLLM: grammar mask (`allowed`), logit_bias, min_tokens (bans EOS and
    stop_token_ids while the output is shorter than min_tokens; EOS is not banned under
    ignore_eos, since then it does not stop anything), repetition penalty, presence and
    frequency penalties. Logprobs are the model's own distribution, as OpenAI reports them:
    log_softmax of the logits before logit_bias, min_tokens and penalties (and temperature,
    top-k/top-p/min-p), with tokens the grammar forbids at -inf. Then greedy rows take the
    argmax; sampled
    rows apply temperature, top-k, top-p, min-p and draw with the exponential race.
    """

    def __init__(self, vocab_size: int, eos_ids: frozenset[int] = frozenset(), *,
                 seed: int | None = None) -> None:
        self.vocab_size = vocab_size  # logits columns (may exceed the tokenizer's vocabulary)
        self.eos_ids = frozenset(eos_ids)
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}  # for unseeded rows

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams], *,
                 prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
                 generators: Sequence[torch.Generator | None],
                 allowed: torch.Tensor | None = None,
                 counts: Sequence[TokenCounts | None] | None = None) -> SamplerOutput:
        """Sample one token per row; `allowed` is an optional [B, V] bool grammar mask,
        `counts` each row's running penalty counts (else counted from the id lists)."""
        num_rows = logits.shape[0]
        assert logits.shape == (num_rows, self.vocab_size), f"logits {tuple(logits.shape)}"
        assert len(params) == len(prompt_ids) == len(output_ids) == len(generators) == num_rows
        processed = self.process_logits(logits, params, prompt_ids=prompt_ids,
                                        output_ids=output_ids, allowed=allowed, counts=counts)
        token_ids = self._sample(processed, params, generators)
        reported = processed  # the model's own distribution: before bias, bans and penalties
        if processed is not logits and any(p.logprobs is not None for p in params):
            reported = logits.float()
            if allowed is not None:
                reported = reported.masked_fill(~allowed.to(reported.device), -math.inf)
        logprobs, top_logprobs = _gather_logprobs(reported, token_ids, params)
        return SamplerOutput(token_ids.tolist(), logprobs, top_logprobs)

    def process_logits(self, logits: torch.Tensor, params: Sequence[SamplingParams], *,
                       prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
                       allowed: torch.Tensor | None = None,
                       counts: Sequence[TokenCounts | None] | None = None) -> torch.Tensor:
        """[B, V] float32 logits after mask, logit_bias, min_tokens and penalties (input kept)."""
        needs_min_tokens = any(len(out) < p.min_tokens for p, out in zip(params, output_ids))
        if allowed is None and not needs_min_tokens and not any(
                p.logit_bias or p.has_penalties for p in params):
            return logits.float()  # nothing to change: no copy
        work = logits.to(torch.float32, copy=True)
        if allowed is not None:  # built on the CPU by llguidance; moved to the logits' device
            assert allowed.shape == work.shape and allowed.dtype == torch.bool
            allowed = allowed.to(work.device, non_blocking=True)
            work.masked_fill_(~allowed, -math.inf)
        apply_logit_bias(work, params)
        if needs_min_tokens:
            self._apply_min_tokens(work, params, output_ids)
        apply_penalties(work, params, prompt_ids, output_ids, counts)
        if allowed is not None:
            _check_some_token_left(work, allowed, params)
        return work

    def _apply_min_tokens(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                          output_ids: Sequence[Sequence[int]]) -> None:
        rows: list[int] = []
        banned_ids: list[int] = []
        for row, (p, out) in enumerate(zip(params, output_ids)):
            if len(out) < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
                rows += [row] * len(banned)
                banned_ids += sorted(banned)
        if rows:
            index = (_long(rows, logits.device), _long(banned_ids, logits.device))
            logits.index_put_(index, torch.tensor(-math.inf, device=logits.device))

    def _sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """[B] token ids: argmax for greedy rows, a filtered random draw for the others."""
        sampled_rows = [row for row, p in enumerate(params) if not p.is_greedy]
        if not sampled_rows:
            return logits.argmax(dim=-1)
        everything = len(sampled_rows) == len(params)
        index = _long(sampled_rows, logits.device)
        chosen = [params[row] for row in sampled_rows]
        temperature = torch.tensor([p.temperature for p in chosen], device=logits.device)
        tempered = (logits if everything else logits[index]) / temperature[:, None]
        filter_logits(tempered, top_k=[p.top_k for p in chosen], top_p=[p.top_p for p in chosen],
                      min_p=[p.min_p for p in chosen])
        drawn = self._race(tempered, [generators[row] for row in sampled_rows])
        if everything:
            return drawn
        token_ids = logits.argmax(dim=-1)
        token_ids[index] = drawn
        return token_ids

    def _race(self, logits: torch.Tensor, generators: Sequence[torch.Generator | None]
              ) -> torch.Tensor:
        """One draw per row from softmax(logits): argmax(probs / E) with E ~ Exponential(1).

        E = -log(U), U ~ Uniform[0, 1): on this CPU exponential_() is ~7x slower than
        uniform_() + log, and U = 0 gives E = inf (that token cannot win) where E = 0 would
        let any token win. A seeded row computes its E alone, from its own generator, in a
        fresh [V] tensor, so its token does not depend on what else is in the batch (up to
        last-bit rounding in batched float kernels, which only an exact tie would notice).
        """
        probs = logits.softmax(dim=-1)  # [R, V]
        noise = torch.empty_like(probs)  # E
        if any(generator is None for generator in generators):
            noise.uniform_(generator=self._default_generator(probs.device)).log_().neg_()
        for row, generator in enumerate(generators):
            if generator is not None:
                own = torch.empty(probs.shape[-1], device=generator.device)
                noise[row] = own.uniform_(generator=generator).log_().neg_()
        return probs.div_(noise).argmax(dim=-1)

    def _default_generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator


def filter_logits(logits: torch.Tensor, *, top_k: Sequence[int | None], top_p: Sequence[float],
                  min_p: Sequence[float]) -> torch.Tensor:
    """Top-k, then top-p, then min-p on [B, V] tempered logits, in place (removed: -inf).

    Same semantics as transformers' TopK/TopP/MinP warpers: top-k keeps ties with the k-th
    value; top-p keeps the smallest set of most likely tokens whose mass reaches p (after
    top-k, renormalized); min-p keeps tokens with prob >= min_p * max prob. Rows that need
    none of them are untouched.
    """
    vocab_size = logits.shape[-1]
    ks = [vocab_size if k is None else min(k, vocab_size) for k in top_k]
    if any(k < vocab_size or p < 1.0 for k, p in zip(ks, top_p)):
        # A full sort of [8, 49152] costs ~24 ms on this CPU, topk(256) ~1 ms: so, as
        # llama.cpp does, filter among the most likely candidates first and widen (in the
        # end, sort fully) only for rows whose nucleus reaches past them.
        rows = list(range(len(ks)))
        first = max([NUM_CANDIDATES, *(k for k in ks if k < vocab_size)])
        for num_candidates in (first, 16 * first, vocab_size):
            rows = _filter_rows(logits, rows, ks, top_p, min(num_candidates, vocab_size))
            if not rows:
                break
    if any(m > 0.0 for m in min_p):
        ratio = torch.tensor(min_p, device=logits.device)[:, None]
        # prob_i < min_p * prob_max  <=>  logit_i < logit_max + log(min_p); log(0) keeps all
        threshold = logits.amax(dim=-1, keepdim=True) + ratio.log()
        logits.masked_fill_(logits < threshold, -math.inf)
    return logits


def _filter_rows(logits: torch.Tensor, rows: list[int], ks: list[int], ps: Sequence[float],
                 num_candidates: int) -> list[int]:
    """`_top_k_top_p` on some rows of `logits`; returns those still unsettled."""
    if len(rows) == logits.shape[0]:
        return _top_k_top_p(logits, ks, ps, num_candidates)
    index = _long(rows, logits.device)
    subset = logits[index]
    unsettled = _top_k_top_p(subset, [ks[r] for r in rows], [ps[r] for r in rows],
                             num_candidates)
    logits[index] = subset
    return [rows[i] for i in unsettled]


def _top_k_top_p(logits: torch.Tensor, ks: list[int], ps: Sequence[float],
                 num_candidates: int) -> list[int]:
    """Top-k then top-p among each row's `num_candidates` largest logits, in place.

    Every top-k row fits (num_candidates >= its k); returns the rows without top-k whose
    nucleus reaches past the candidates, which it leaves untouched.
    """
    vocab_size = logits.shape[-1]
    values, order = logits.topk(num_candidates, dim=-1)  # [B, K], descending
    k = _long(ks, logits.device)[:, None]
    p = torch.tensor(ps, device=logits.device)[:, None]
    is_limited = k < vocab_size
    kth = values.gather(1, k.clamp(max=num_candidates) - 1)
    values.masked_fill_(is_limited & (values < kth), -math.inf)
    # Top-p renormalizes over the top-k set (inside the candidates), or else the whole row.
    log_total = torch.where(is_limited, values.logsumexp(dim=-1, keepdim=True),
                            logits.logsumexp(dim=-1, keepdim=True))
    probs = (values - log_total).exp()
    cumulative = probs.cumsum(dim=-1)
    # (p == 1 keeps all: a cumsum may round up to 1 before the tail.)
    values.masked_fill_((cumulative - probs >= p) & (p < 1.0), -math.inf)
    is_settled = (is_limited | (p >= 1.0) | (cumulative[:, -1:] >= p)
                  | (num_candidates == vocab_size))
    unsettled = (~is_settled).squeeze(1).nonzero().squeeze(1).tolist()
    if not unsettled and all(k < vocab_size or p_row < 1.0 for k, p_row in zip(ks, ps)):
        logits.fill_(-math.inf).scatter_(1, order, values)  # every row changes: no where()
    else:
        is_changed = is_settled & (is_limited | (p < 1.0))
        filtered = torch.full_like(logits, -math.inf).scatter_(1, order, values)
        logits.copy_(torch.where(is_changed, filtered, logits))
    return unsettled



def _check_some_token_left(logits: torch.Tensor, allowed: torch.Tensor,
                           params: Sequence[SamplingParams]) -> None:
    """Raise if the grammar mask and min_tokens together leave a row nothing to sample."""
    dead = torch.isneginf(logits.amax(dim=-1))
    if bool(dead.any()):
        row = int(dead.nonzero()[0])
        assert bool(allowed[row].any()), f"the grammar mask of batch row {row} allows no token"
        raise RequestError(
            f"min_tokens={params[row].min_tokens} bans every token the grammar allows next "
            f"(EOS or a stop token id)", param="min_tokens")


def _gather_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                     params: Sequence[SamplingParams]
                     ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Chosen-token logprob and top alternatives (finite ones only) for rows that ask."""
    logprobs: list[float | None] = [None] * len(params)
    top_logprobs: list[list[tuple[int, float]] | None] = [None] * len(params)
    rows = [row for row, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return logprobs, top_logprobs
    index = _long(rows, logits.device)
    log_probs = logits[index].log_softmax(dim=-1)  # [R, V]
    chosen = log_probs.gather(1, token_ids[index][:, None]).squeeze(1).tolist()
    num_top = min(max(params[row].logprobs or 0 for row in rows), logits.shape[-1])
    top_values, top_ids = log_probs.topk(num_top, dim=-1)  # [R, num_top], descending
    values_list, ids_list = top_values.tolist(), top_ids.tolist()
    for j, row in enumerate(rows):
        num = params[row].logprobs or 0
        logprobs[row] = chosen[j]
        top_logprobs[row] = [(token_id, value) for token_id, value
                             in zip(ids_list[j][:num], values_list[j][:num]) if value > -math.inf]
    return logprobs, top_logprobs


def _long(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
