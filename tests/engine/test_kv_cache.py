"""The KV pool's memory: reserved up front, resident only where blocks are written."""

from __future__ import annotations

import pytest
import torch

from levante.config import EngineConfig, ModelConfig
from levante.engine import kv_budget
from levante.engine.engine import Engine
from levante.engine.kv_cache import KVCache
from levante.errors import ConfigError
from levante.model import Transformer


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def test_pool_pages_are_not_touched_before_use() -> None:
    config = ModelConfig(dim=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=128,
                         ffn_dim=512, vocab_size=256, max_seq_len=65536)
    before = _resident_mib()
    # 4 layers x K/V x 65536 slots x 2 heads x 128 x 4 bytes = 512 MiB reserved
    cache = KVCache(config, num_blocks=4096, block_size=16, dtype=torch.float32)
    reserved = _resident_mib() - before
    assert sum(t.nbytes for t in cache.keys + cache.values) == 2**29
    assert reserved < 64, f"an unused 512 MiB pool made {reserved:.0f} MiB resident"
    assert float(cache.keys[3][-16:].abs().sum()) == 0.0  # unused slots read as zeros
    cache.keys[0][:16 * 512] = 1.0  # 512 blocks of layer 0's keys: 8 MiB
    grown = _resident_mib() - before
    assert 8 <= grown < 64 + 8, f"writing 8 MiB grew RSS by {grown:.0f} MiB"


def _tiny_model() -> Transformer:
    config = ModelConfig(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                         ffn_dim=128, vocab_size=128, max_seq_len=4096)
    return Transformer(config).eval()


def test_a_budget_below_one_sequence_fails_at_start_with_the_numbers() -> None:
    """2 layers x 2 KV heads x 32 x K/V x 2 bytes = 512 bytes a token in float16: 4096 tokens
    need 2 MiB; a 1 MiB budget is refused before any request, naming what to change."""
    model = _tiny_model()
    with pytest.raises(ConfigError, match=r"--kv-cache-memory 1 MiB cannot hold one sequence of "
                                          r"max_model_len 4096 tokens: that takes 2 MiB of "
                                          r"float16 KV.*--max-model-len to 2048"):
        Engine(model, None, EngineConfig(max_model_len=4096, kv_cache_memory=2**20,
                                         kv_cache_dtype="float16"))
    engine = Engine(model, None, EngineConfig(max_model_len=2048, kv_cache_memory=2**20,
                                              kv_cache_dtype="float16"))
    assert engine.capacity_tokens == 2048


def test_automatic_pool_holds_one_sequence_or_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_model()
    config = EngineConfig(max_model_len=4096, max_num_seqs=16, kv_cache_dtype="float16")
    # a quarter of 6 MiB is less than one 2 MiB sequence: the pool still takes one (reserved,
    # untouched), since it fits what is left
    monkeypatch.setattr(kv_budget, "_available_memory", lambda: 6 * 2**20)
    assert Engine(model, None, config).capacity_tokens == 4096
    monkeypatch.setattr(kv_budget, "_available_memory", lambda: 2**20)
    with pytest.raises(ConfigError, match=r"takes 2 MiB of float16 KV, and 1 MiB of memory is "
                                          r"left.*--max-model-len to 2048"):
        Engine(model, None, config)
