"""The KV pool's size: its storage dtype and its number of blocks, from the config and memory."""

from __future__ import annotations

import torch

from levante.config import EngineConfig
from levante.engine.kv_cache import KVCache
from levante.errors import ConfigError
from levante.model import Transformer
from levante.quant import kernels


def kv_cache_dtype(model: Transformer, config: EngineConfig) -> torch.dtype | str:
    """The pool's storage: the one named, or for "auto" 16 bits, as llama.cpp and GPU
    servers keep it: the activations' dtype if it is 16-bit, else float16 when the CPU
    kernel computes in float32 (it widens each block exactly as it reads it), else the
    activations' dtype. Mistral Small 3 at 32K: 5 GiB, not 10. (Only where the CPU kernel
    may run: the SDPA and flex backends read the pool as the activations' dtype.)"""
    if config.kv_cache_dtype != "auto":
        return config.kv_cache_dtype
    dtype = model.model.embed_tokens.weight.dtype
    if (dtype == torch.float32 and model.rope_cos.device.type == "cpu" and kernels.available()
            and config.attention_backend in ("auto", "cpu_kernel")):
        return torch.float16
    return dtype


def kv_pool_blocks(model: Transformer, config: EngineConfig, dtype: torch.dtype | str) -> int:
    """Blocks the KV pool gets: exact, from a byte budget, or what max_num_seqs sequences need.

    The automatic size is capped at a quarter of the machine's available memory on CPU (the
    pool is reserved, not touched: RSS grows with the tokens cached) and at 90% of free device
    memory on CUDA, but never below one sequence at max_model_len while that fits the memory
    left. A budget (given or available) that cannot hold one such sequence is a ConfigError
    with the numbers, at start rather than when a long request arrives.
    """
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = KVCache.bytes_per_block(model.config, config.block_size, dtype)
    per_sequence = -(-config.max_model_len // config.block_size)
    needed = per_sequence * per_block
    if config.kv_cache_memory is not None:
        if config.kv_cache_memory < needed:
            raise ConfigError(
                f"--kv-cache-memory {_mib(config.kv_cache_memory)} cannot hold one sequence of "
                f"max_model_len {config.max_model_len} tokens: that takes {_mib(needed)} of "
                f"{_kv_name(dtype)} KV. Raise --kv-cache-memory to at least {_mib(needed)}, "
                f"lower --max-model-len to {config.kv_cache_memory // per_block * config.block_size}"
                f", or use --kv-cache-dtype q8_0")
        return config.kv_cache_memory // per_block
    wanted = config.max_num_seqs * per_sequence
    device = model.rope_cos.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        available = budget = int(free * 0.9)
    else:
        available = _available_memory()
        budget = available // 4
    if needed > available:
        raise ConfigError(
            f"the KV cache for one sequence of max_model_len {config.max_model_len} tokens takes "
            f"{_mib(needed)} of {_kv_name(dtype)} KV, and {_mib(available)} of memory is left "
            f"after the weights. Lower --max-model-len to "
            f"{available // per_block * config.block_size} or use --kv-cache-dtype q8_0")
    return max(per_sequence, min(wanted, budget // per_block))

def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def _kv_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
