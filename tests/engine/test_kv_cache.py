"""The KV pool's memory: reserved up front, resident only where blocks are written."""

from __future__ import annotations

import torch

from levante.config import ModelConfig
from levante.engine.kv_cache import KVCache


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
