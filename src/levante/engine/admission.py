"""Whether a request can ever run on an engine: its token ids, and max_tokens within the context.

These read only configuration, never the engine's state, so a check is safe from any thread:
the server refuses a request that can never run with a 400 before it queues (even when the
queue is full), and checks the ids other routes are given the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from levante.engine.sampling_params import SamplingParams
from levante.errors import ContextLengthError, RequestError


def check_vocabulary(token_ids: Sequence[int], vocab_size: int, *, param: str) -> None:
    """RequestError naming `param` for the first id outside [0, vocab_size)."""
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})",
                           param=param)


def check_prompt(prompt_ids: Sequence[int], vocab_size: int) -> list[int]:
    """The prompt as a list of ints: RequestError if it is empty or leaves the vocabulary."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise RequestError("the prompt is empty", param="prompt")
    check_vocabulary(prompt, vocab_size, param="prompt")
    return prompt


def resolve_max_tokens(num_prompt: int, params: SamplingParams, *, context: int,
                       capacity_tokens: int) -> int:
    """max_tokens (None: the rest of the context), or ContextLengthError when the prompt and
    max_tokens exceed `context` tokens or the KV pool's `capacity_tokens`."""
    if params.max_tokens is None:
        if num_prompt >= context:
            raise ContextLengthError(
                f"the prompt has {num_prompt} tokens; this model's context is {context}")
        max_tokens = context - num_prompt
    else:
        max_tokens = params.max_tokens
        if num_prompt + max_tokens > context:
            raise ContextLengthError(
                f"this model's maximum context length is {context} tokens; the prompt has "
                f"{num_prompt} tokens and max_tokens is {max_tokens} "
                f"({num_prompt + max_tokens} in all)")
    if num_prompt + max_tokens > capacity_tokens:
        raise ContextLengthError(
            f"prompt ({num_prompt}) + max_tokens ({max_tokens}) exceeds the KV cache's "
            f"{capacity_tokens} tokens; this request could never run")
    return max_tokens
