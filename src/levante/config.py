"""ModelConfig: the shape of a Mistral/Llama-family transformer, from presets or model files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from levante.errors import ConfigError

# KV cache storage (`--kv-cache-dtype`) and the bytes one cached K or V value takes in it: q8_0
# is int8 plus one float16 scale per 32 values (llama.cpp's 8-bit KV cache). "auto": 16-bit
# (see `Engine.kv_cache_dtype`). Here, not in load_config, so this module needs no torch.
KV_BYTES_PER_VALUE = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "q8_0": 1 + 2 / 32}
KV_CACHE_DTYPES = ("auto", *KV_BYTES_PER_VALUE)
ATTENTION_BACKENDS = ("auto", "cpu_kernel", "sdpa", "flex")
DECODE_GRAPH_MODES = ("auto", "on", "off", "uncaptured")

MAX_DIMENSION = {"num_layers": 1024, "num_heads": 4096, "num_kv_heads": 4096,
                 "head_dim": 4096, "vocab_size": 2**22}


def _whole(value: Any, name: str) -> int:
    """An integer field from a model file: ints only (no bools, floats or strings)."""
    if type(value) is not int:
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return value


# What a model file may ask for that Levante computes differently or not at all: each is
# refused by name rather than loaded into a model that would give other numbers.
HF_MODEL_TYPES = ("llama", "mistral")
# params.json keys Levante reads or that do not change the computation (any other key set to
# something other than null/false/{} names a feature mistral-inference has and we lack).
PARAMS_KEYS = frozenset({"dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads",
                         "norm_eps", "vocab_size", "rope_theta", "max_seq_len", "max_batch_size",
                         "tied_embeddings", "model_type", "sliding_window", "_sliding_window"})


def _unimplemented(where: str, key: str, value: Any, feature: str) -> ConfigError:
    """The error for a model-file setting that selects a feature Levante lacks."""
    shown = repr(value) if len(repr(value)) <= 120 else repr(value)[:117] + "..."
    return ConfigError(f"{where} sets {key} = {shown}: {feature} is not implemented in Levante")


def _check_window(where: str, key: str, window: Any, context: int) -> None:
    """A sliding window at least as long as the context never slides: accept it; refuse others."""
    if window is None:
        return
    if type(window) is not int or window <= 0:
        raise ConfigError(f"{where}: {key} must be a positive integer or null, got {window!r}")
    if window < context:
        raise _unimplemented(where, key, window, f"sliding-window attention (a window shorter "
                                                 f"than the {context}-token context)")


def _check_rope(value: Any, where: str, key: str, *, default: str | None) -> None:
    """Accept an HF `rope_scaling`/`rope_parameters` entry only for plain RoPE ("default").

    transformers 5 writes `rope_parameters` ({"rope_theta": ..., "rope_type": "default"});
    older files write `rope_scaling` ({"type": "linear", "factor": 2.0}) or null.
    """
    if value is None or value == {}:
        return
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be an object or null, got {value!r}")
    if value.get("rope_type", value.get("type", default)) != "default":
        raise _unimplemented(where, key, value, "RoPE scaling")


def _check_hf_features(hf: dict[str, Any]) -> None:
    """Refuse config.json settings that change the computation in ways Levante lacks."""
    where = "config.json"
    model_type = hf.get("model_type")
    if model_type is not None and model_type not in HF_MODEL_TYPES:
        raise _unimplemented(where, "model_type", model_type,
                             f"this architecture (Levante runs {' and '.join(HF_MODEL_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unimplemented(where, "hidden_act", hf["hidden_act"], "an activation other than SiLU")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _unimplemented(where, key, hf[key], "a projection bias")
    _check_rope(hf.get("rope_scaling"), where, "rope_scaling", default=None)
    _check_rope(hf.get("rope_parameters"), where, "rope_parameters", default="default")
    if hf.get("quantization_config") is not None:
        raise _unimplemented(where, "quantization_config", hf["quantization_config"],
                             "loading a pre-quantized checkpoint of this kind")
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window") is not False:  # Qwen2's switch
        _check_window(where, "sliding_window", window,
                      int(hf.get("max_position_embeddings", 4096)))


def _check_params_features(params: dict[str, Any], context: int) -> None:
    """Refuse params.json keys Levante does not implement (MoE, LoRA, vision, sliding window)."""
    where = "params.json"
    for key, value in params.items():
        if key not in PARAMS_KEYS and value not in (None, False, {}, []):
            raise _unimplemented(where, key, value, f"the {key!r} option")
    if params.get("model_type", "transformer") != "transformer":
        raise _unimplemented(where, "model_type", params["model_type"],
                             "a model other than a transformer")
    for key in ("sliding_window", "_sliding_window"):
        _check_window(where, key, params.get(key), context)


def _check_gguf_features(meta: dict[str, Any], arch: str, *, head_dim: int,
                         context: int) -> None:
    """Refuse GGUF metadata selecting RoPE scaling, sliding windows, partial rotary or MoE."""
    where = "GGUF metadata"
    scaling = f"{arch}.rope.scaling.type"
    if meta.get(scaling) not in (None, "none", "linear"):
        raise _unimplemented(where, scaling, meta[scaling], "RoPE scaling")
    for key in (f"{arch}.rope.scaling.factor", f"{arch}.rope.scale_linear"):
        if meta.get(key) not in (None, 0, 1):  # llama.cpp reads 0 as "not set"
            raise _unimplemented(where, key, meta[key], "RoPE scaling")
    window = f"{arch}.attention.sliding_window"
    _check_window(where, window, meta.get(window), context)
    rotary = f"{arch}.rope.dimension_count"
    if meta.get(rotary, head_dim) != head_dim:
        raise _unimplemented(where, rotary, meta[rotary],
                             f"rotary embedding of part of a head (head_dim is {head_dim})")
    experts = f"{arch}.expert_count"
    if meta.get(experts):
        raise _unimplemented(where, experts, meta[experts], "mixture of experts")


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of a decoder-only transformer (HF naming in comments)."""

    vocab_size: int  # vocab_size
    dim: int  # hidden_size
    num_layers: int  # num_hidden_layers
    num_heads: int  # num_attention_heads
    num_kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim (Mistral Small 3: 128, not dim // num_heads)
    ffn_dim: int  # intermediate_size
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 4096  # max_position_embeddings
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
            # Bounds far above any real model, so a crafted file cannot make us allocate
            # (a rope table for 2**40 positions) or loop (2**40 layers) without limit.
            if value > MAX_DIMENSION.get(name, 2**20):
                raise ConfigError(f"ModelConfig.{name} = {value} is beyond any real model "
                                  f"(at most {MAX_DIMENSION.get(name, 2**20)})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim must be even for rotary, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ConfigError(f"ModelConfig.rope_theta must be positive, got {self.rope_theta!r}")
        if not 0 < self.norm_eps < 1:
            raise ConfigError(f"ModelConfig.norm_eps must be in (0, 1), got {self.norm_eps!r}")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count (embedding, layers, final norm, untied output head)."""
        attn = self.dim * self.head_dim * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * self.dim * self.ffn_dim
        layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.num_layers * layer + self.dim + head

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """KV-cache bytes one token takes: layers x kv heads x head_dim x (K and V) x dtype."""
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * bytes_per_element

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """From a transformers `config.json` (Mistral or Llama); features we lack are refused."""
        try:
            _check_hf_features(hf)
            num_heads = int(hf["num_attention_heads"])
            dim = int(hf["hidden_size"])
            rope = hf.get("rope_theta")
            if rope is None:  # newer transformers nests it under rope_parameters
                rope = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                vocab_size=int(hf["vocab_size"]),
                dim=dim,
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or dim // num_heads),
                ffn_dim=int(hf["intermediate_size"]),
                rope_theta=float(rope),
                norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                max_seq_len=int(hf.get("max_position_embeddings", 4096)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_id=hf.get("bos_token_id"),
                eos_ids=tuple(int(e) for e in eos_ids),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a malformed field: {e}") from None

    @classmethod
    def from_params(cls, params: dict[str, Any], *, max_seq_len: int = 32768) -> ModelConfig:
        """From a Mistral `params.json` (consolidated format); features we lack are refused."""
        try:
            _check_params_features(params, int(params.get("max_seq_len", max_seq_len)))
            dim = int(params["dim"])
            num_heads = int(params["n_heads"])
            return cls(
                vocab_size=int(params["vocab_size"]),
                dim=dim,
                num_layers=int(params["n_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(params.get("n_kv_heads") or num_heads),
                head_dim=int(params.get("head_dim") or dim // num_heads),
                ffn_dim=int(params["hidden_dim"]),
                rope_theta=float(params.get("rope_theta", 10000.0)),
                norm_eps=float(params.get("norm_eps", 1e-5)),
                max_seq_len=int(params.get("max_seq_len", max_seq_len)),
                tie_embeddings=bool(params.get("tied_embeddings", False)),
                bos_id=1,
                eos_ids=(2,),
            )
        except KeyError as e:
            raise ConfigError(f"params.json lacks required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"params.json has a malformed field: {e}") from None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], *, has_output_tensor: bool) -> ModelConfig:
        """From GGUF metadata (`general.architecture` = llama or mistral); features we lack
        (RoPE scaling, sliding window, MoE) are refused. Tensors are checked by the loader."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "mistral"):
            raise ConfigError(f"unsupported GGUF architecture {arch!r} (need llama or mistral)")

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            if value is None:
                raise ConfigError(f"GGUF metadata lacks {arch}.{name}")
            return value

        def whole(name: str, default: Any = None) -> int:
            return _whole(key(name, default), f"{arch}.{name}")

        try:
            dim = whole("embedding_length")
            num_heads = whole("attention.head_count")
            if num_heads <= 0:
                raise ConfigError(f"{arch}.attention.head_count must be positive, got {num_heads}")
            tokens = meta.get("tokenizer.ggml.tokens")
            vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list)
                                                       else 0)
            eos = meta.get("tokenizer.ggml.eos_token_id")
            bos = meta.get("tokenizer.ggml.bos_token_id")
            config = cls(
                vocab_size=_whole(vocab, f"{arch}.vocab_size"),
                dim=dim,
                num_layers=whole("block_count"),
                num_heads=num_heads,
                num_kv_heads=whole("attention.head_count_kv", num_heads),
                head_dim=whole("attention.key_length", dim // num_heads),
                ffn_dim=whole("feed_forward_length"),
                rope_theta=float(key("rope.freq_base", 10000.0)),
                norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
                max_seq_len=whole("context_length", 4096),
                tie_embeddings=not has_output_tensor,
                bos_id=None if bos is None else _whole(bos, "tokenizer.ggml.bos_token_id"),
                eos_ids=() if eos is None else (_whole(eos, "tokenizer.ggml.eos_token_id"),),
            )
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"GGUF metadata has a malformed value: {e}") from None
        _check_gguf_features(meta, arch, head_dim=config.head_dim, context=config.max_seq_len)
        return config


PRESETS: dict[str, ModelConfig] = {
    # Mistral-Small-24B-Instruct-2501: HF config.json and params.json agree on these.
    "mistral-small-3": ModelConfig(
        vocab_size=131072, dim=5120, num_layers=40, num_heads=32, num_kv_heads=8, head_dim=128,
        ffn_dim=32768, rope_theta=100_000_000.0, norm_eps=1e-5, max_seq_len=32768,
        tie_embeddings=False, bos_id=1, eos_ids=(2,)),
    # SmolLM2-135M-Instruct (as in its GGUF): Llama architecture, tied embeddings.
    "smollm2": ModelConfig(
        vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        ffn_dim=1536, rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192,
        tie_embeddings=True, bos_id=1, eos_ids=(2,)),
}


def preset(name: str) -> ModelConfig:
    """A named preset; the error lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches and caches: limits the scheduler and KV pool work within."""

    max_model_len: int = 4096  # prompt + output tokens per sequence
    max_num_seqs: int = 16  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens per step (prefill chunk budget)
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int | None = None  # bytes for the KV pool; None = sized automatically
    kv_cache_dtype: str = "auto"  # auto (the activations' dtype), float32, bfloat16, float16, q8_0
    num_kv_blocks: int | None = None  # exact pool size (tests); overrides kv_cache_memory
    max_queue: int = 256  # waiting requests before new ones are refused
    enable_prefix_caching: bool = False
    num_speculative_tokens: int = 0  # prompt-lookup drafts per step for greedy requests; 0 = off
    speculative_ngram: int = 3  # longest n-gram matched against earlier tokens to draft
    # Drafts only while at most this many requests run (vLLM's disable-by-batch-size): a
    # bigger batch is compute-bound, where each draft row costs as much as a token.
    speculative_max_batch: int = 4
    # A row's numbers independent of its batch neighbours on any device (vLLM's option). The
    # CPU float32 path already is (its kernels); elsewhere each sequence then runs in its own
    # forward pass: exact, at the cost of batching.
    batch_invariant: bool = False
    # Which attention reads the paged KV pool: "auto" (the CPU kernel on CPU in float32,
    # FlexAttention on CUDA where torch has it, else SDPA), "cpu_kernel" (the compiled C++
    # kernel, CPU float32), "sdpa" (gather each sequence's blocks per layer, then SDPA) or
    # "flex" (FlexAttention reading the pool in place through a block mask; compiled on CUDA,
    # eager and slow elsewhere: forcing it on CPU is for tests).
    attention_backend: str = "auto"
    # Decode steps (one token per sequence) as CUDA graphs (engine/cuda_graphs.py): "auto"
    # (on CUDA with the flex backend and no LoRA adapters), "on" (that, or a ConfigError),
    # "off", or "uncaptured" (the same padded static-input step without a graph, any device:
    # for tests).
    decode_graphs: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                     "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if not 0 <= self.num_speculative_tokens <= 16 or self.speculative_ngram < 1:
            raise ConfigError(f"EngineConfig.num_speculative_tokens must be 0..16 and "
                              f"speculative_ngram >= 1, got {self.num_speculative_tokens!r}, "
                              f"{self.speculative_ngram!r}")
        if not isinstance(self.speculative_max_batch, int) or self.speculative_max_batch < 1:
            raise ConfigError(f"EngineConfig.speculative_max_batch must be a positive integer, "
                              f"got {self.speculative_max_batch!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ConfigError(f"EngineConfig.num_kv_blocks must be positive, got "
                              f"{self.num_kv_blocks!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"EngineConfig.attention_backend must be one of "
                              f"{', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}")
        if self.decode_graphs not in DECODE_GRAPH_MODES:
            raise ConfigError(f"EngineConfig.decode_graphs must be one of "
                              f"{', '.join(DECODE_GRAPH_MODES)}, got {self.decode_graphs!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"EngineConfig.kv_cache_dtype must be one of "
                              f"{', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"EngineConfig.kv_cache_memory must be positive, got "
                              f"{self.kv_cache_memory!r}")
