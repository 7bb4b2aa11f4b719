"""Batch invariance on CPU: a request's greedy tokens do not depend on how its tokens were batched.

SmolLM2 on its own quantized blocks (8-bit activations per row, so float noise in attention
becomes different near-tie tokens): each prompt alone is the reference; batched, behind a
warm prefix cache, in small prefill chunks, with prompt-lookup drafts, or preempted and
recomputed, every request must give the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from levante.bundle import Bundle, load
from levante.config import EngineConfig
from levante.engine.engine import Engine
from levante.engine.sampling_params import SamplingParams
from levante.quant import kernels

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def bundle(smollm2_gguf: Path) -> Bundle:
    if not kernels.available():
        pytest.skip("batch invariance on CPU comes from the compiled attention kernel")
    return load(str(smollm2_gguf))  # the default: computes with the file's quantized blocks


def _encode(bundle: Bundle, texts: list[str]) -> list[list[int]]:
    return [bundle.tokenizer.encode(t, add_bos=bundle.tokenizer.should_add_bos) for t in texts]


@pytest.fixture(scope="module")
def prompts(bundle: Bundle) -> list[list[int]]:
    """Eight prompts of 6 to 27 tokens. Before prefill chunks went through the paged kernel,
    behind a warm prefix cache one of them diverged from its tokens alone."""
    return _encode(bundle, [f"Write about item {i}: " + "word " * (3 * i) for i in range(8)])


def _engine(bundle: Bundle, **config: int | bool | str) -> Engine:
    return Engine(bundle.model, None, EngineConfig(max_model_len=512, **config))


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY
         ) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    outs = engine.run_to_completion(ids)
    assert engine.pool.num_free == engine.pool.num_blocks
    return [[t for o in outs[rid] for t in o.new_token_ids] for rid in ids]


def _alone(bundle: Bundle, prompts: list[list[int]]) -> list[list[int]]:
    engine = _engine(bundle)
    return [_run(engine, [p])[0] for p in prompts]


@pytest.fixture(scope="module")
def expected(bundle: Bundle, prompts: list[list[int]]) -> list[list[int]]:
    return _alone(bundle, prompts)


def test_batched_equals_alone(bundle: Bundle, prompts: list[list[int]],
                              expected: list[list[int]]) -> None:
    assert _run(_engine(bundle), prompts) == expected


def test_warm_prefix_cache_equals_alone(bundle: Bundle, prompts: list[list[int]],
                                        expected: list[list[int]]) -> None:
    """The second pass prefills only each prompt's tail, as a short chunk after cached blocks."""
    engine = _engine(bundle, enable_prefix_caching=True)
    assert _run(engine, prompts) == expected
    cold = engine.num_computed_tokens
    assert _run(engine, prompts) == expected
    assert engine.num_computed_tokens - cold < cold  # the cache was hit
    # one at a time, behind the blocks the batch left
    assert [_run(engine, [p])[0] for p in prompts] == expected


def test_chunked_prefill_equals_alone(bundle: Bundle, prompts: list[list[int]],
                                      expected: list[list[int]]) -> None:
    """Prompts in chunks of 7 tokens, next to other requests' decode steps."""
    assert _run(_engine(bundle, max_num_batched_tokens=7), prompts) == expected


def test_preemption_equals_alone(bundle: Bundle, prompts: list[list[int]],
                                 expected: list[list[int]]) -> None:
    """A pool too small for all eight: preempted requests recompute their tokens."""
    assert _run(_engine(bundle, num_kv_blocks=12), prompts) == expected


def test_speculative_drafts_equal_alone(bundle: Bundle) -> None:
    """Drafts verified as a multi-token chunk give the tokens plain decoding gives (the second
    prompt's did not when the chunk went through SDPA)."""
    texts = ["one two three four five six seven eight nine ten. " * 4 + "one two three",
             "Write about item 3: " + "word " * 9, "red green blue, " * 6 + "red"]
    prompts = _encode(bundle, texts)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = _engine(bundle)
    alone = [_run(plain, [p], params)[0] for p in prompts]
    spec = _engine(bundle, num_speculative_tokens=3)
    assert _run(spec, prompts, params) == alone
    assert spec.num_accepted_tokens > 0


@pytest.mark.parametrize("kv_cache_dtype", ["float16", "q8_0"])
def test_narrow_kv_cache_batched_equals_alone(bundle: Bundle, prompts: list[list[int]],
                                              kv_cache_dtype: str) -> None:
    """A 16-bit or q8_0 KV pool keeps batch invariance: chunked, batched and behind a warm
    prefix cache, each request gives its tokens alone (with the same KV dtype)."""
    engine = _engine(bundle, kv_cache_dtype=kv_cache_dtype)
    assert engine.runner.cache.kv_dtype == kv_cache_dtype
    alone = [_run(engine, [p])[0] for p in prompts[:5]]
    mixed = _engine(bundle, kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=7,
                    enable_prefix_caching=True)
    assert _run(mixed, prompts[:5]) == alone
    assert _run(mixed, prompts[:5]) == alone  # warm


def test_q8_0_kv_cache_with_preemption_and_drafts_equals_alone(bundle: Bundle,
                                                              prompts: list[list[int]]) -> None:
    """q8_0 KV combined with preemption (a pool too small for all) and prompt-lookup drafts:
    the tokens each request gets alone with the same KV dtype."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    alone_engine = _engine(bundle, kv_cache_dtype="q8_0")
    alone = [_run(alone_engine, [p], params)[0] for p in prompts]
    mixed = _engine(bundle, kv_cache_dtype="q8_0", num_kv_blocks=12, num_speculative_tokens=3,
                    enable_prefix_caching=True)
    assert _run(mixed, prompts, params) == alone
