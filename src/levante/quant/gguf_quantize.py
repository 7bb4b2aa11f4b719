"""Quantizing to GGUF as llama.cpp's quantizer does: the type each tensor gets, and its bytes.

A format (`GGUF_FORMATS`) is one type for every 2-D tensor (f16, bf16, q8_0, q6_k, q4_0,
q4_1) or a K-quant mix (q5_k_m, q4_k_m, q3_k_m) that picks a type per tensor as llama.cpp's
`llama_tensor_get_type` does (`llama_cpp_type`; a tied embedding is the output head there).
Rows that are not whole blocks of the choice fall back as in llama.cpp (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, Q3_K and Q2_K -> Q4_0). `levante quantize` writes these types
(levante.quant.export), `--quant q4_k_m` at load computes in them (levante.quant.gguf_model)
and `levante plan` sizes them (levante.plan). `encode` gives a float tensor's bytes in a type:
K-quants by levante.quant.k_quantize (llama.cpp's reference algorithms, same bytes), the
legacy block types (Q8_0, Q4_0, Q4_1, ...) by `gguf.quants.quantize`.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from levante.errors import ConfigError
from levante.quant.k_quantize import K_QUANTIZERS
from levante.quant.k_quantize import quantize as k_quantize

Q = GGMLQuantizationType

GGUF_FORMATS: dict[str, tuple[GGMLQuantizationType | None, int]] = {
    # format -> (type of every 2-D tensor, or None for a mix; llama.cpp's general.file_type)
    "f16": (Q.F16, 1), "bf16": (Q.BF16, 32), "q8_0": (Q.Q8_0, 7), "q6_k": (Q.Q6_K, 18),
    "q5_k_m": (None, 17), "q4_k_m": (None, 15), "q3_k_m": (None, 12), "q4_0": (Q.Q4_0, 2),
    "q4_1": (Q.Q4_1, 3),
}
# The quantized formats of one type; llama.cpp still gives Q4_0 / Q4_1 files a Q6_K output.
SINGLE_TYPES = {"q8_0": Q.Q8_0, "q6_k": Q.Q6_K, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
# llama.cpp's type for rows that are not whole blocks of the chosen type (tensor_type_fallback)
LLAMA_CPP_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1,
                      Q.Q6_K: Q.Q8_0}


def _use_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: first/last eighth and every third."""
    return (layer < num_layers // 8 or layer >= 7 * num_layers // 8
            or (layer - num_layers // 8) % 3 == 2)


def llama_cpp_type(fmt: str, name: str, num_layers: int) -> GGMLQuantizationType:
    """The GGUF type llama.cpp's quantizer gives tensor `name` (HF naming) under `fmt`.

    Simplified from llama.cpp's `llama_tensor_get_type` for dense Llama/Mistral models
    (before its fallback for rows that are not whole blocks: `export_type`).
    Q4_K_M / Q5_K_M: attn_v and ffn_down of `_use_more_bits` layers and the output get Q6_K,
    the rest Q4_K / Q5_K. Q3_K_M: attn_v Q5_K in the first two layers else Q4_K, ffn_down Q5_K
    in the first sixteenth else Q4_K, attn_output Q4_K, output Q6_K, the rest Q3_K.
    Q4_0 / Q4_1 files keep the output at Q6_K; Q8_0 and Q6_K are uniform.
    """
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
    if fmt in SINGLE_TYPES:
        base = SINGLE_TYPES[fmt]
        return base if base in (Q.Q8_0, Q.Q6_K) or name != "lm_head.weight" else Q.Q6_K
    if name == "lm_head.weight":
        return Q.Q6_K
    if fmt == "q3_k_m":
        return _q3_k_m_type(name, layer, num_layers)
    if fmt not in ("q4_k_m", "q5_k_m"):
        raise ConfigError(f"no llama.cpp type rule for format {fmt!r}")
    more = name.endswith(("v_proj.weight", "down_proj.weight")) and _use_more_bits(
        layer, num_layers)
    return Q.Q6_K if more else (Q.Q4_K if fmt == "q4_k_m" else Q.Q5_K)


def _q3_k_m_type(name: str, layer: int, num_layers: int) -> GGMLQuantizationType:
    if name.endswith("v_proj.weight"):
        return Q.Q5_K if layer < 2 else Q.Q4_K
    if name.endswith("down_proj.weight"):
        return Q.Q5_K if layer < num_layers // 16 else Q.Q4_K
    if name.endswith("o_proj.weight"):
        return Q.Q4_K
    return Q.Q3_K


def export_type(fmt: str, name: str, shape: tuple[int, ...], num_layers: int, *,
                is_tied: bool = False) -> Q:
    """The GGUF type `fmt` writes tensor `name` (HF naming) in; norms stay F32.

    llama.cpp's choice (`llama_cpp_type`, with a tied embedding treated as the output
    head), then `_fallback_type` where rows are not whole blocks of it.
    """
    chosen = llama_cpp_choice(fmt, name, shape, num_layers, is_tied)
    if chosen in (Q.F32, Q.F16, Q.BF16, Q.Q8_0):
        return chosen
    return _fallback_type(chosen, name, shape[-1])


def llama_cpp_choice(fmt: str, name: str, shape: tuple[int, ...], num_layers: int,
                      is_tied: bool) -> Q:
    """llama.cpp's type for the tensor before any fallback for its row length."""
    single, _ = GGUF_FORMATS[fmt]
    if len(shape) == 1:
        return Q.F32
    if single in (Q.F16, Q.BF16, Q.Q8_0):
        return single
    rule_name = "lm_head.weight" if is_tied and name == "model.embed_tokens.weight" else name
    return llama_cpp_type(fmt, rule_name, num_layers)


def _fallback_type(chosen: Q, name: str, row_size: int) -> Q:
    """`chosen`, or what llama.cpp writes when rows of `row_size` are not whole blocks of it.

    A fallback whose blocks do not fit either becomes F16, as in llama.cpp.
    Example: Q4_K with rows of 576 (SmolLM2) -> Q5_0.
    """
    if row_size % GGML_QUANT_SIZES[chosen][0] == 0:
        return chosen
    if chosen not in LLAMA_CPP_FALLBACK:
        raise ConfigError(f"{name}: rows of {row_size} values are not whole {chosen.name} "
                          f"blocks of {GGML_QUANT_SIZES[chosen][0]}")
    fallback = LLAMA_CPP_FALLBACK[chosen]
    return fallback if row_size % GGML_QUANT_SIZES[fallback][0] == 0 else Q.F16


def encode(tensor: torch.Tensor, qtype: Q) -> np.ndarray:
    """float32 [..., K] -> what GGUFWriter stores: F32/F16 values, else uint8 block bytes."""
    array = tensor.contiguous().numpy()
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    if qtype in K_QUANTIZERS:
        return k_quantize(array, qtype, num_threads=torch.get_num_threads())
    return quants.quantize(array, qtype)
