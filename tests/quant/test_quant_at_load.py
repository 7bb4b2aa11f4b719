"""`--quant q8_0|q4_k_m|...` on a float checkpoint: its linears become the GGUF blocks
`levante quantize --to` (llama.cpp's quantizer) writes, computed by the GGUF kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf import GGUFReader

from levante import LLM, SamplingParams
from levante.bundle import load
from levante.errors import ConfigError
from levante.quant.export import quantize_checkpoint
from levante.quant.gguf_linear import CastEmbedding, KQuantLinear

# our module path -> the GGUF tensor of the same weight
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return model.logits(model(ids)).float()


@pytest.fixture(scope="module")
def reference(tiny_mistral_hf: Path) -> torch.Tensor:
    return _logits(load(str(tiny_mistral_hf), dtype="float32").model)


@pytest.mark.parametrize(("fmt", "min_cosine"), [("q8_0", 0.9995), ("q4_k_m", 0.985)])
def test_linears_get_the_blocks_quantize_writes(tiny_mistral_hf: Path, tmp_path: Path,
                                                reference: torch.Tensor, fmt: str,
                                                min_cosine: float) -> None:
    bundle = load(str(tiny_mistral_hf), quant=fmt)
    assert bundle.load_config.quant == fmt and bundle.load_config.dtype == "float32"
    model = bundle.model
    assert isinstance(model.model.embed_tokens, CastEmbedding)  # stored bf16, rows widened
    out = quantize_checkpoint(tiny_mistral_hf, to=fmt, out=tmp_path / f"m-{fmt}.gguf",
                              progress=False)
    assert out.num_tensors > 0
    stored = {t.name: t for t in GGUFReader(tmp_path / f"m-{fmt}.gguf").tensors}
    for i, layer in enumerate(model.model.layers):
        for path, gguf_name in GGUF_NAMES.items():
            module = layer.get_submodule(path)
            tensor = stored[f"blk.{i}.{gguf_name}.weight"]
            qtype = getattr(module, "qtype", None) or module.weight_packed.qtype
            assert qtype == tensor.tensor_type, (i, path)
            if isinstance(module, KQuantLinear) and "q_proj" not in path \
                    and "k_proj" not in path:  # q/k rows are permuted in the file
                assert torch.equal(module.blocks.reshape(-1),
                                   torch.from_numpy(tensor.data.copy()).reshape(-1))
    head = model.lm_head
    assert (getattr(head, "qtype", None) or head.weight_packed.qtype) == \
        stored["output.weight"].tensor_type
    cosine = float(F.cosine_similarity(_logits(model).flatten(), reference.flatten(), dim=0))
    assert cosine > min_cosine


def test_llm_generates_after_quantizing_at_load(tiny_mistral_hf: Path) -> None:
    llm = LLM(str(tiny_mistral_hf), quant="q4_k_m", max_model_len=256)
    done = llm.generate([1, 1500, 1600, 1700], SamplingParams(max_tokens=5, temperature=0.0,
                                                              ignore_eos=True))[0]
    assert len(done.token_ids) == 5
    assert any(isinstance(m, KQuantLinear) for m in llm.bundle.model.modules())


def test_gguf_formats_at_load_are_for_float_checkpoints(smollm2_gguf: Path) -> None:
    with pytest.raises(ConfigError, match="q4_k_m"):
        load(str(smollm2_gguf), quant="q4_k_m")
