"""Decode graphs' static step (engine/cuda_graphs.py), run uncaptured on the CPU: padded rows,
static inputs and a block mask built from them give the eager step's logits and tokens.
The capture itself needs CUDA: the gpu-marked test runs it where a GPU is present."""

from __future__ import annotations

import logging

import pytest
import torch

from levante.config import EngineConfig
from levante.engine import flex_attention
from levante.engine.cuda_graphs import GRAPH_SIZES, DecodeGraphs, resolve_decode_graphs
from levante.engine.engine import Engine
from levante.engine.sampling_params import SamplingParams
from levante.errors import ConfigError
from levante.model import Transformer

pytestmark = [
    pytest.mark.skipif(not flex_attention.is_available(), reason="this torch has no FlexAttention"),
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]


def _config(mode: str, **overrides: object) -> EngineConfig:
    settings: dict = dict(max_model_len=256, num_kv_blocks=48, block_size=8,
                          max_num_batched_tokens=32, kv_cache_dtype="float32",
                          max_num_seqs=6, attention_backend="flex", decode_graphs=mode)
    settings.update(overrides)
    return EngineConfig(**settings)


def _prompts(model: Transformer, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist()
            for n in lengths]


def _tokens(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    outs = engine.run_to_completion(ids)
    return [[t for o in outs[r] for t in o.new_token_ids] for r in ids]


def _counting(run, calls: list[int]):
    def counted(batch):
        calls.append(len(batch))
        return run(batch)
    return counted


def test_graph_steps_give_the_eager_steps_tokens_and_logprobs(
        model: Transformer, caplog: pytest.LogCaptureFixture) -> None:
    """5 sequences decoding together (padded to 8 rows), one finishing early; a long prompt
    arriving later is prefilled in chunks while the others decode (those mixed steps run
    eagerly, the decode-only ones from the graphs), then decodes on alone (1 row)."""
    prompts = _prompts(model, (5, 9, 7, 6, 3, 60))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2)
    results = {}
    for mode in ("off", "uncaptured"):
        with caplog.at_level(logging.INFO, logger="levante.engine.runner"):
            engine = Engine(model, None, _config(mode))
        calls: list[int] = []
        if engine.runner.graphs is not None:
            engine.runner.graphs.run = _counting(engine.runner.graphs.run, calls)
        ids = [engine.add_request(p, params if i else short) for i, p in enumerate(prompts[:5])]
        early = engine.step() + engine.step()
        ids.append(engine.add_request(prompts[5], params))
        outs = engine.run_to_completion(ids)
        for out in reversed(early):
            outs[out.request_id].insert(0, out)
        results[mode] = [[(t, round(lp, 4), top) for o in outs[r] for t, lp, top in
                          zip(o.new_token_ids, o.logprobs, o.top_logprobs)] for r in ids]
        if mode == "uncaptured":
            assert "decode steps: static padded inputs, not captured" in caplog.text
            assert 5 in calls and 1 in calls, str(calls)  # 5 rows run padded to 8
    assert results["uncaptured"] == results["off"]
    assert [len(r) for r in results["off"]] == [3, 10, 10, 10, 10, 10]


def test_padded_rows_touch_only_the_spare_block(model: Transformer) -> None:
    """The pool's blocks other than the spare one hold what the eager run writes (3 rows
    padded to 4: the padded row writes only into the spare block)."""
    prompts = _prompts(model, (9, 12, 20))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    pools = {}
    for mode in ("off", "uncaptured"):
        engine = Engine(model, None, _config(mode, enable_prefix_caching=False))
        _tokens(engine, prompts, params)
        cache = engine.runner.cache
        pools[mode] = torch.stack([k for k in cache.keys])[:, :engine.pool.num_blocks * 8]
        if mode == "uncaptured":
            assert cache.num_blocks == engine.pool.num_blocks + 1
            spare = engine.runner.graphs.spare_block
            assert spare == engine.pool.num_blocks  # the pool never hands it out
    # Real blocks hold the same K/V (up to float32 noise from 4 rows instead of 3 per matmul);
    # blocks no sequence used are still zeros in both.
    torch.testing.assert_close(pools["uncaptured"], pools["off"], rtol=1e-5, atol=1e-5)


def test_combined_with_prefix_caching_preemption_and_sampling(model: Transformer) -> None:
    """A pool too small for all (preemption and recompute), shared prefixes, n=2 seeded
    sampling and stop-free greedy: the graph steps change no token."""
    base = _prompts(model, (24,))[0]
    prompts = [base + [5, 6], base + [7], base[:16] + [9, 9, 9], base]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=3, n=2,
                             ignore_eos=True)
    results = {}
    for mode in ("off", "uncaptured"):
        engine = Engine(model, None, _config(mode, num_kv_blocks=9, enable_prefix_caching=True))
        results[mode] = (_tokens(engine, prompts, greedy), _tokens(engine, prompts[:2], sampled))
        if mode == "uncaptured":
            assert engine.num_preemptions > 0 and engine.runner.graphs.steps > 10
    assert results["uncaptured"] == results["off"]


def test_a_failed_capture_runs_the_step_and_the_rest_uncaptured(
        model: Transformer, caplog: pytest.LogCaptureFixture) -> None:
    """A capture that raises (an H200 run: flex fell back to an eager path that copies from
    the CPU, which capture forbids) costs no request: the step and all after it run as the
    "uncaptured" mode does, with a warning. The CPU stands in for the GPU: capture is set on
    and recording raises as it did there."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = _prompts(model, (5, 9, 3))
    expected = _tokens(Engine(model, None, _config("uncaptured")), prompts, params)
    engine = Engine(model, None, _config("uncaptured"))
    graphs = engine.runner.graphs
    attempts = []

    def failing_record(size: int) -> None:
        attempts.append(size)
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")

    graphs.capture, graphs._record = True, failing_record
    with caplog.at_level(logging.WARNING, logger="levante.engine.cuda_graphs"):
        assert _tokens(engine, prompts, params) == expected
    assert attempts == [4] and not graphs.capture and graphs.steps > 5
    assert "capturing batch size 4 failed" in caplog.text


def test_sizes_and_eligibility(model: Transformer) -> None:
    engine = Engine(model, None, _config("uncaptured", max_num_seqs=20))
    graphs = engine.runner.graphs
    assert isinstance(graphs, DecodeGraphs)
    assert graphs.sizes == [1, 2, 4, 8, 16, 20]
    assert graphs.max_blocks == 256 // 8
    assert set(GRAPH_SIZES) >= set(graphs.sizes[:-1])


def test_modes_resolve_and_refuse_with_reasons(model: Transformer) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_decode_graphs("auto", device=cpu, attention_backend="flex",
                                 has_adapters=False) == "off"
    assert resolve_decode_graphs("auto", device=cuda, attention_backend="flex",
                                 has_adapters=False) == "captured"
    assert resolve_decode_graphs("auto", device=cuda, attention_backend="sdpa",
                                 has_adapters=False) == "off"
    assert resolve_decode_graphs("auto", device=cuda, attention_backend="flex",
                                 has_adapters=True) == "off"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_decode_graphs("on", device=cpu, attention_backend="flex", has_adapters=False)
    with pytest.raises(ConfigError, match="flex attention backend"):
        resolve_decode_graphs("on", device=cuda, attention_backend="sdpa", has_adapters=False)
    with pytest.raises(ConfigError, match="LoRA"):
        resolve_decode_graphs("uncaptured", device=cpu, attention_backend="flex",
                              has_adapters=True)
    with pytest.raises(ConfigError, match="decode_graphs"):
        EngineConfig(decode_graphs="always")
    assert Engine(model, None, _config("auto")).runner.graphs is None  # CPU: eager steps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_graphs_give_the_eager_tokens_on_cuda(model: Transformer) -> None:
    cuda_model = Transformer(model.config).to("cuda", torch.bfloat16).eval()
    cuda_model.load_state_dict(model.state_dict())
    prompts = _prompts(model, (5, 40, 17))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    results = {}
    for mode in ("off", "on"):
        # FlexAttention's GPU kernel reads the pool in blocks of a multiple of 16 tokens
        engine = Engine(cuda_model, None, _config(mode, kv_cache_dtype="bfloat16", block_size=16,
                                                  num_kv_blocks=24))
        results[mode] = _tokens(engine, prompts, params)
        if mode == "on":
            assert engine.runner.graphs is not None and engine.runner.graphs.graphs
    assert results["on"] == results["off"]
