"""Engine properties on a tiny random Mistral: cached decode, batching, preemption, aborts."""

from __future__ import annotations

import pytest
import torch

from levante.config import EngineConfig
from levante.engine.engine import Engine
from levante.engine.sampling_params import SamplingParams
from levante.errors import ContextLengthError, RequestError
from levante.model import Transformer


def _prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _greedy_reference(model: Transformer, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy tokens from full forward passes with no cache at all."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model.logits(model(torch.tensor([ids])))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    outs = engine.run_to_completion(ids)
    return [[t for o in outs[rid] for t in o.new_token_ids] for rid in ids]


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def test_cached_decode_equals_full_forward(model: Transformer) -> None:
    prompt = _prompts(model.config.vocab_size, [23])[0]
    engine = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=64,
                                              block_size=4))
    assert _run(engine, [prompt], GREEDY)[0] == _greedy_reference(model, prompt, 12)


def test_batched_equals_alone_with_chunked_prefill(model: Transformer) -> None:
    prompts = _prompts(model.config.vocab_size, [5, 40, 17, 63, 1, 29, 8, 50])
    alone = []
    for p in prompts:
        engine = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=64))
        alone.append(_run(engine, [p], GREEDY)[0])
    # A small token budget forces chunked prefill mixed with decodes.
    engine = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=128,
                                              max_num_batched_tokens=32, block_size=8))
    assert _run(engine, prompts, GREEDY) == alone
    assert engine.pool.num_free == engine.pool.num_blocks


def test_preemption_under_tiny_cache_keeps_outputs(model: Transformer) -> None:
    prompts = _prompts(model.config.vocab_size, [30, 30, 30, 30])
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    roomy = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=64, block_size=4))
    expected = _run(roomy, prompts, params)
    # 28 blocks of 4 = 112 tokens: 4 requests of 50 tokens cannot all stay resident.
    tight = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=28, block_size=4))
    ids = [tight.add_request(p, params) for p in prompts]
    outs = tight.run_to_completion(ids)
    assert [[t for o in outs[r] for t in o.new_token_ids] for r in ids] == expected
    assert tight.pool.num_free == tight.pool.num_blocks


def test_abort_frees_blocks(model: Transformer) -> None:
    engine = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=64))
    ids = [engine.add_request(p, GREEDY) for p in _prompts(model.config.vocab_size, [9, 33])]
    engine.step()
    engine.step()
    assert engine.pool.num_free < engine.pool.num_blocks
    for rid in ids:
        engine.abort(rid)
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.has_work


def test_context_and_vocab_errors(model: Transformer) -> None:
    engine = Engine(model, None, EngineConfig(max_model_len=64, num_kv_blocks=64))
    with pytest.raises(ContextLengthError, match="60 tokens and max_tokens is 10"):
        engine.add_request([5] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request([model.config.vocab_size], SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([], SamplingParams(max_tokens=1))
    small = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=2, block_size=4))
    with pytest.raises(ContextLengthError, match="could never run"):
        small.add_request([5] * 6, SamplingParams(max_tokens=4))
    assert not engine.has_work and not small.has_work


def test_seeded_sampling_is_reproducible_in_a_batch(model: Transformer) -> None:
    prompts = _prompts(model.config.vocab_size, [11, 19])
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    engine = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=64))
    alone = _run(engine, [prompts[0]], params)[0]
    together = _run(engine, prompts, params)[0]
    assert alone == together


def test_prefix_cache_reuses_blocks_and_keeps_outputs(model: Transformer) -> None:
    system = _prompts(model.config.vocab_size, [40])[0]
    turns = [system + p for p in _prompts(model.config.vocab_size, [5, 9, 13])]
    config = EngineConfig(max_model_len=512, num_kv_blocks=64, block_size=8)
    plain = Engine(model, None, config)
    expected = [_run(plain, [t], GREEDY)[0] for t in turns]
    cached = Engine(model, None, config.__class__(**{**config.__dict__,
                                                     "enable_prefix_caching": True}))
    got = []
    for turn in turns:
        before = cached.num_computed_tokens
        got.append(_run(cached, [turn], GREEDY)[0])
        computed = cached.num_computed_tokens - before
    assert got == expected
    # the 40-token shared prefix holds 5 full blocks: the last turn recomputed none of them
    assert computed <= len(turns[-1]) - 40 + GREEDY.max_tokens
    assert cached.pool.num_free == cached.pool.num_blocks


def test_prefix_cache_under_pressure_keeps_outputs(model: Transformer) -> None:
    prompts = _prompts(model.config.vocab_size, [30, 30, 30, 30])
    shared = prompts[0][:16]
    prompts = [shared + p for p in prompts]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    roomy = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=64, block_size=4))
    expected = _run(roomy, prompts, params)
    tight = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=30, block_size=4,
                                             enable_prefix_caching=True))
    assert _run(tight, prompts, params) == expected
    assert tight.pool.num_free == tight.pool.num_blocks


def test_speculative_decoding_keeps_greedy_outputs(model: Transformer) -> None:
    """Prompt-lookup drafts on repetitive prompts: same tokens, and some drafts accepted."""
    base = _prompts(model.config.vocab_size, [6, 9, 4])
    prompts = [p * 6 for p in base]  # repetitive, like text a summary copies from
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=64, block_size=4))
    expected = _run(plain, prompts, params)
    spec = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=64, block_size=4,
                                            num_speculative_tokens=4))
    assert _run(spec, prompts, params) == expected
    assert spec.num_draft_tokens > 0
    assert spec.pool.num_free == spec.pool.num_blocks
    # sampled (non-greedy) requests never speculate and stay seed-reproducible
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    assert _run(spec, prompts[:1], seeded) == _run(plain, prompts[:1], seeded)


def test_identical_prompts_in_one_step_share_the_prefill(model: Transformer) -> None:
    """n > 1 choices (or one prompt sent twice) join the same step; the second reuses the
    blocks the first fills in that step instead of computing the prompt again."""
    prompt = _prompts(model.config.vocab_size, [37])[0]
    config = EngineConfig(max_model_len=512, num_kv_blocks=64, block_size=8,
                          enable_prefix_caching=True)
    alone = _run(Engine(model, None, config), [prompt], GREEDY)[0]
    engine = Engine(model, None, config)
    ids = [engine.add_request(prompt, GREEDY) for _ in range(3)]
    requests = [engine.requests[rid] for rid in ids]
    first = {out.request_id: out.new_token_ids for out in engine.step()}
    assert set(first) == set(ids)  # all three sampled a token in the first step
    assert [r.num_cached_tokens for r in requests] == [0, 32, 32]  # 4 full blocks of 8 shared
    assert engine.num_computed_tokens == 37 + 5 + 5
    outs = engine.run_to_completion(ids)
    assert [first[r] + [t for o in outs[r] for t in o.new_token_ids] for r in ids] == [alone] * 3
    assert engine.pool.num_free == engine.pool.num_blocks


def test_block_hashes_name_the_tokens_after_accepted_drafts(model: Transformer) -> None:
    """Drafts accepted in a step are computed before their tokens are appended: the blocks
    they fill are hashed once the tokens are known, so every hash names its block's tokens
    (a wrong hash would let a later prompt reuse blocks that do not hold its tokens)."""
    from levante.engine.kv_blocks import block_hash

    base = _prompts(model.config.vocab_size, [6, 9])
    prompts = [p * 6 for p in base]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    config = EngineConfig(max_model_len=512, num_kv_blocks=64, block_size=4,
                          num_speculative_tokens=4, enable_prefix_caching=True)
    engine = Engine(model, None, config)
    ids = [engine.add_request(p, params) for p in prompts]
    requests = [engine.requests[rid] for rid in ids]
    engine.run_to_completion(ids)
    assert engine.num_accepted_tokens > 0
    for request in requests:
        tokens = request.prompt_ids + request.output_ids
        parent = None
        assert len(request.block_hashes) >= (len(tokens) - 1) // 4 - 1
        for i, digest in enumerate(request.block_hashes):
            parent = block_hash(parent, tokens[4 * i:4 * i + 4])
            assert digest == parent, f"block {i}"
    # and a prompt equal to a finished request's tokens is served from those blocks
    reuse = requests[0].prompt_ids + requests[0].output_ids[:20]
    before = engine.scheduler.num_prefix_hit_tokens
    again = _run(engine, [reuse], SamplingParams(max_tokens=4, temperature=0.0,
                                                 ignore_eos=True))[0]
    assert engine.scheduler.num_prefix_hit_tokens - before >= len(reuse) - 8
    plain = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=64, block_size=4))
    assert again == _run(plain, [reuse], SamplingParams(max_tokens=4, temperature=0.0,
                                                        ignore_eos=True))[0]


def test_drafting_request_preempted_by_itself_loses_its_drafts(model: Transformer) -> None:
    """The youngest request proposes drafts, cannot grow, and preempts itself: readmitted,
    it recomputes its tokens, not the stale drafts; outputs stay the plain engine's."""
    base = _prompts(model.config.vocab_size, [5, 7, 6])
    prompts = [p * 5 for p in base]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    plain = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=64, block_size=4))
    expected = [_run(plain, [p], params)[0] for p in prompts]
    tight = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=20, block_size=4,
                                             num_speculative_tokens=4,
                                             enable_prefix_caching=True))
    assert _run(tight, prompts, params) == expected
    assert tight.num_preemptions > 0 and tight.num_accepted_tokens > 0


def test_prompt_lookup_index_equals_a_full_scan() -> None:
    """The incremental n-gram index proposes what scanning the whole context would."""
    import random

    from levante.engine.drafts import NgramIndex
    from levante.engine.request import Request

    def scan(tokens: list[int], max_n: int, k: int) -> list[int]:
        for n in range(min(max_n, len(tokens) - 1), 0, -1):
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tokens[-n:]:
                    return tokens[start + n:start + n + k]
        return []

    rng = random.Random(0)
    for _ in range(200):
        max_n = rng.randint(1, 4)
        request = Request("r", [rng.randint(0, 5) for _ in range(rng.randint(1, 20))],
                          GREEDY, 100)
        index = NgramIndex(max_n)
        for _ in range(25):
            k = rng.randint(1, 5)
            if rng.random() < 0.7:  # not every step drafts: the index catches up
                tokens = request.prompt_ids + request.output_ids
                assert index.propose(request, k) == scan(tokens, max_n, k)
            request.output_ids.extend(rng.randint(0, 5) for _ in range(rng.randint(1, 3)))


def test_drafts_adapt_to_acceptance_and_stop_in_big_batches(model: Transformer) -> None:
    """A request drafts more after full acceptance, less after rejections, pauses after
    drafts that all fail; no request drafts while more than speculative_max_batch run."""
    from levante.engine.request import Request

    request = Request("r", [1, 2, 3], GREEDY, 10)
    request.record_drafts(4, 4, most=5)
    assert request.num_drafts == 5
    request.record_drafts(5, 2, most=5)
    assert request.num_drafts == 3
    request.record_drafts(3, 0, most=5)
    assert request.num_drafts == 1
    request.record_drafts(1, 0, most=5)
    assert (request.num_drafts, request.draft_pause) == (1, 8)

    prompts = [p * 6 for p in _prompts(model.config.vocab_size, [6, 9, 4, 5, 7, 8])]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outputs = []
    for most in (4, 8):  # six requests that run and finish together
        engine = Engine(model, None, EngineConfig(max_model_len=512, num_kv_blocks=128,
                                                  block_size=4, num_speculative_tokens=4,
                                                  speculative_max_batch=most))
        outputs.append(_run(engine, prompts, params))
        assert (engine.num_draft_tokens > 0) == (most >= len(prompts))
    assert outputs[0] == outputs[1]


def test_batch_invariant_option_splits_where_the_kernels_are_not(model: Transformer) -> None:
    """The tiny float32 model multiplies with BLAS, whose rounding depends on the row count:
    with batch_invariant each sequence runs alone, so batched logits equal alone bit for bit
    (and speculation, which verifies drafts in extra rows, stays exact)."""
    from levante.engine.engine import invariant_kernels

    assert not invariant_kernels(model)
    prompts = _prompts(model.config.vocab_size, [5, 40, 17, 63])
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
    config = EngineConfig(max_model_len=512, num_kv_blocks=128, block_size=4,
                          batch_invariant=True, num_speculative_tokens=2)

    def logprobs(engine: Engine, batch: list[list[int]]) -> list[list[float | None]]:
        ids = [engine.add_request(p, params) for p in batch]
        outs = engine.run_to_completion(ids)
        return [[lp for o in outs[r] for lp in o.logprobs] for r in ids]

    engine = Engine(model, None, config)
    assert engine.split_batches
    alone = [logprobs(engine, [p])[0] for p in prompts]
    assert logprobs(engine, prompts) == alone
