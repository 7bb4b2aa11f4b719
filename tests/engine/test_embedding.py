"""EmbeddingJob: chunked paged prefill pooled into vectors equals the unchunked forward, and
borrows KV blocks from the engine's pool only while it runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from levante.config import EngineConfig
from levante.engine.embedding import EmbeddingJob, Pooling
from levante.engine.engine import Engine


@pytest.fixture(scope="module")
def engine(smollm2_gguf: Path) -> Engine:
    """The served Q4_1 file with a float32 KV pool of 40 blocks (640 tokens)."""
    from levante.bundle import load

    bundle = load(str(smollm2_gguf), max_seq_len=2048)
    config = EngineConfig(max_model_len=640, num_kv_blocks=40, kv_cache_dtype="float32",
                          max_num_batched_tokens=512)
    return Engine(bundle.model, bundle.tokenizer, config)


def _prompts(engine: Engine) -> list[list[int]]:
    text = " ".join(f"word{i} is followed by more text." for i in range(60))
    long_ids = engine.tokenizer.encode(text)[:500]
    assert len(long_ids) == 500
    return [long_ids, engine.tokenizer.encode("hello there"), [1]]


def _run(engine: Engine, prompts: list[list[int]], pooling: Pooling,
         chunk_tokens: int) -> torch.Tensor:
    job = EmbeddingJob(prompts, pooling=pooling, chunk_tokens=chunk_tokens)
    num_chunks = 0
    while not job.is_done:
        assert job.advance(engine)
        num_chunks += 1
    assert num_chunks == sum(-(-len(p) // chunk_tokens) for p in prompts)
    assert engine.pool.num_free == engine.pool.num_blocks  # every borrowed block is back
    return job.result(engine.model.config.dim)


@pytest.mark.parametrize("pooling", list(Pooling))
def test_chunked_equals_unchunked_and_the_plain_forward(engine: Engine,
                                                        pooling: Pooling) -> None:
    prompts = _prompts(engine)
    whole = _run(engine, prompts, pooling, chunk_tokens=512)
    chunked = _run(engine, prompts, pooling, chunk_tokens=37)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        for prompt, vector in zip(prompts, whole):
            hidden = engine.model(torch.tensor([prompt]))[0]  # [S, dim], SDPA, no KV cache
            expected = {Pooling.MEAN: hidden.double().mean(0).float(), Pooling.CLS: hidden[0],
                        Pooling.LAST: hidden[-1]}[pooling]
            cosine = torch.nn.functional.cosine_similarity(vector, expected, dim=0)
            assert cosine > 0.999, (len(prompt), float(cosine))  # 8-bit activations


def test_mean_differs_from_last(engine: Engine) -> None:
    prompts = _prompts(engine)[:2]
    mean = _run(engine, prompts, Pooling.MEAN, chunk_tokens=512)
    last = _run(engine, prompts, Pooling.LAST, chunk_tokens=512)
    assert not torch.allclose(mean, last, atol=1e-2)


def test_waits_while_the_pool_is_short_and_frees_when_dropped(engine: Engine) -> None:
    pool = engine.pool
    held = pool.allocate(pool.num_blocks - 2)  # running requests hold all but 2 blocks
    assert held is not None
    job = EmbeddingJob([list(range(1, 100))], pooling=Pooling.MEAN, chunk_tokens=16)
    assert not job.advance(engine) and job.num_computed == 0  # needs 7 blocks
    pool.free(held)
    assert job.advance(engine) and job.num_computed == 16
    assert pool.num_free == pool.num_blocks - 7
    job.release(engine)
    assert pool.num_free == pool.num_blocks
