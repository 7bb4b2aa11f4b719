"""Sampling parameters and the batched sampler: penalties, bias, masks, greedy/temperature/top-k/top-p/min-p, seeds, logprobs."""

from __future__ import annotations

import dataclasses
import itertools
import math
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from levante.errors import RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGPROBS = 20
MAX_N = 16
MAX_SEED = 2**63 - 1
NUM_CANDIDATES = 256  # top-k/top-p look at this many most likely tokens first
GREEDY_BELOW_TEMPERATURE = 1e-5  # as vLLM: logits / 1e-30 would overflow float32


def _invalid(param: str, rule: str, value: object, *, label: str | None = None) -> RequestError:
    """A RequestError naming the field, the rule and the (shortened) offending value."""
    return RequestError(f"{label or param} must be {rule}, got {reprlib.repr(value)}", param=param)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(param: str, value: object, lo: int, hi: int | None = None, *,
               optional: bool = False) -> None:
    if optional and value is None:
        return
    rule = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if not _is_int(value) or value < lo or (hi is not None and value > hi):  # type: ignore[operator]
        raise _invalid(param, rule + (" or None" if optional else ""), value)


def _check_float(param: str, value: object, lo: float, hi: float, *, lo_open: bool = False,
                 label: str | None = None) -> float:
    """`value` as a float if it is a finite number in [lo, hi] (or (lo, hi]); else raise."""
    rule = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _invalid(param, rule, value, label=label)
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        raise _invalid(param, rule, value, label=label)
    return float(value)


def _check_stop(stop: object) -> None:
    if not isinstance(stop, tuple) or not all(isinstance(s, str) for s in stop):
        raise _invalid("stop", "a tuple of strings", stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise _invalid("stop", f"at most {MAX_STOP_STRINGS} strings", f"{len(stop)} strings")
    for text in stop:
        if not 0 < len(text) <= MAX_STOP_CHARS:
            raise _invalid("stop", f"non-empty strings of at most {MAX_STOP_CHARS} characters",
                           text, label="each stop string")


def _check_token_ids(param: str, token_ids: object) -> None:
    if not isinstance(token_ids, tuple):
        raise _invalid(param, "a tuple of token ids", token_ids)
    for token_id in token_ids:
        _check_int(param, token_id, 0)


def _normalize_logit_bias(pairs: object) -> tuple[tuple[int, float], ...]:
    """Validate (token_id, bias) pairs and return them sorted by token id."""
    if not isinstance(pairs, tuple):
        raise _invalid("logit_bias", "a tuple of (token_id, bias) pairs", pairs)
    if len(pairs) > MAX_LOGIT_BIAS_ENTRIES:
        raise _invalid("logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries",
                       f"{len(pairs)} entries")
    biases: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise _invalid("logit_bias", "a (token_id, bias) pair", pair,
                           label="each logit_bias entry")
        token_id, bias = pair
        if not _is_int(token_id) or token_id < 0:
            raise _invalid("logit_bias", "an integer >= 0", token_id, label="logit_bias token id")
        if token_id in biases:
            raise _invalid("logit_bias", "unique", token_id, label="logit_bias token ids")
        biases[token_id] = _check_float("logit_bias", bias, -100, 100,
                                        label=f"logit_bias[{token_id}]")
    return tuple(sorted(biases.items()))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop; validated on construction.

    temperature 0 (below 1e-5) is greedy. Penalties: `repetition_penalty` as in transformers
    (over prompt and output tokens), `presence_penalty`/`frequency_penalty` as in OpenAI
    (output tokens only). `logit_bias` is stored as (token_id, bias) pairs sorted by id, so
    the object stays hashable. `stop`, `stop_token_ids` and `logit_bias` must be tuples:
    callers convert.
    """

    max_tokens: int | None = 256  # None: up to the context limit
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's plus the top k alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()
    n: int = 1
    # None: none; k: each prompt token's logprob given the tokens before it, plus the top k
    # (the first token has none). With it max_tokens may be 0: score the prompt only.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS, optional=True)
        _check_int("max_tokens", self.max_tokens, 0 if self.prompt_logprobs is not None else 1,
                   optional=True)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens "
                               f"({self.max_tokens})", param="min_tokens")
        self._set_float("temperature", 0, 100)
        self._set_float("top_p", 0, 1, lo_open=True)
        _check_int("top_k", self.top_k, 1, optional=True)
        self._set_float("min_p", 0, 1)
        self._set_float("repetition_penalty", 0, 10, lo_open=True)
        self._set_float("presence_penalty", -2, 2)
        self._set_float("frequency_penalty", -2, 2)
        _check_int("seed", self.seed, 0, MAX_SEED, optional=True)
        _check_stop(self.stop)
        _check_token_ids("stop_token_ids", self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, "a bool", getattr(self, name))
        _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS, optional=True)
        object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))
        _check_int("n", self.n, 1, MAX_N)

    def _set_float(self, name: str, lo: float, hi: float, *, lo_open: bool = False) -> None:
        value = _check_float(name, getattr(self, name), lo, hi, lo_open=lo_open)
        object.__setattr__(self, name, value)

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax: temperature 0 (below 1e-5) or top_k 1."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """True when any repetition, presence or frequency penalty changes the logits."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise RequestError if `stop_token_ids` or `logit_bias` name ids >= vocab_size."""
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                raise _invalid("stop_token_ids", f"token ids < vocab size {vocab_size}", token_id)
        for token_id, _ in self.logit_bias:
            if token_id >= vocab_size:
                raise _invalid("logit_bias", f"token ids < vocab size {vocab_size}", token_id)


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
        _apply_logit_bias(work, params)
        if needs_min_tokens:
            self._apply_min_tokens(work, params, output_ids)
        _apply_penalties(work, params, prompt_ids, output_ids, counts)
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


def _apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
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


def _apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
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
