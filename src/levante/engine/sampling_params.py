"""SamplingParams: how to pick each next token and when to stop, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass
from typing import Any

from levante.errors import RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGPROBS = 20
MAX_N = 16
MAX_SEED = 2**63 - 1
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

