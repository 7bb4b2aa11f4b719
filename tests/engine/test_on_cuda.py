"""The GPU path end to end, where a CUDA GPU is present (`pytest -m gpu`; skipped elsewhere):
a model loaded with the defaults lands on the GPU in bfloat16 with FlexAttention over the paged
pool and captured decode graphs; FlexAttention gives the tokens of SDPA over gathered blocks; a
grammar mask built on the CPU applies to the GPU's logits; int8/int4 layers keep their codes on
the GPU and match their own dequantized weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from levante.config import EngineConfig
from levante.engine import flex_attention
from levante.engine.engine import Engine
from levante.engine.sampler import Sampler
from levante.engine.sampling_params import SamplingParams
from levante.model import Transformer
from tests.engine.test_cuda_graphs import _tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not flex_attention.is_available(), reason="this torch has no FlexAttention"),
]


def _prompts(vocab_size: int, lengths: tuple[int, ...], seed: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def test_defaults_on_cuda_are_bf16_flex_and_graphs(tiny_mistral_hf: Path) -> None:
    from levante.llm import LLM

    llm = LLM(str(tiny_mistral_hf), max_model_len=512)  # device auto: the GPU here
    weight = llm.bundle.model.model.layers[0].mlp.down_proj.weight
    assert weight.device.type == "cuda" and weight.dtype == torch.bfloat16
    runner = llm.engine.runner
    assert runner.attention_backend == "flex"
    assert runner.graphs is not None
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    first = llm.generate([[1, 5, 9, 200, 77]], params)[0].token_ids
    again = llm.generate([[1, 5, 9, 200, 77]], params)[0].token_ids
    assert len(first) == 12 and first == again
    assert runner.graphs.graphs, "a decode-only step ran uncaptured"


def test_flex_gives_the_sdpa_tokens_on_cuda(model: Transformer) -> None:
    """float32 weights and pool, so both backends compute the same function: chunked prefill
    mixed with decodes, a shared prefix (prefix caching), n=2 sampled with a seed."""
    cuda_model = Transformer(model.config).to("cuda").eval()
    cuda_model.load_state_dict(model.state_dict())
    prefix = _prompts(model.config.vocab_size, (40,), seed=9)[0]
    prompts = [*_prompts(model.config.vocab_size, (5, 70, 17)), prefix + [7, 8], prefix + [9]]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=6, temperature=0.8, seed=3, n=2, ignore_eos=True)
    results = {}
    for backend in ("flex", "sdpa"):
        config = EngineConfig(max_model_len=256, num_kv_blocks=96, block_size=16,
                              max_num_batched_tokens=48, kv_cache_dtype="float32",
                              attention_backend=backend)
        engine = Engine(cuda_model, None, config)
        assert engine.runner.attention_backend == backend
        results[backend] = (_tokens(engine, prompts, greedy), _tokens(engine, prompts[:2], sampled))
    assert results["flex"] == results["sdpa"]


def test_a_cpu_grammar_mask_applies_to_cuda_logits() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(3, 500, device="cuda", generator=gen, dtype=torch.bfloat16)
    allowed = torch.zeros(3, 500, dtype=torch.bool)
    allowed[0, [4, 90, 300]] = True
    allowed[1, 17] = True
    allowed[2, :250] = True
    sampler = Sampler(500)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0.0, logprobs=1)]
    out = sampler(logits, params, prompt_ids=[[1]] * 3, output_ids=[[]] * 3,
                  generators=[None, torch.Generator(device="cuda").manual_seed(1), None],
                  allowed=allowed)
    cpu = logits.float().cpu()
    assert out.token_ids[0] == max((4, 90, 300), key=lambda t: cpu[0, t].item())
    assert out.token_ids[1] == 17
    assert out.token_ids[2] == int(cpu[2, :250].argmax())


@pytest.mark.parametrize(("fmt", "kernel"), [("int8", None), ("int4", None), ("int4", "packed")])
def test_quantized_layers_stay_quantized_on_cuda(fmt: str, kernel: str | None) -> None:
    """The default kernel on CUDA (Triton) and PyTorch's int4 kernel (tinygemm), at decode and
    prefill sizes, against the same codes computed in plain torch."""
    from levante.quant.linear import Int4Linear, Int8Linear

    cls = Int8Linear if fmt == "int8" else Int4Linear
    weight = torch.randn(768, 512) * 0.02
    layer = cls.from_float(weight.cuda(), kernel=kernel)  # built on the GPU: kernel chosen there
    assert layer.kernel == (kernel or "triton")  # neither rebuilds the weight per call
    portable = cls.from_float(weight.cuda(), kernel="dequantize")  # the same codes, plain torch
    assert all(b.device.type == "cuda" for b in layer.buffers())
    assert not any(b.is_floating_point() and b.shape == weight.shape for b in layer.buffers())
    for rows in (1, 7, 300):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        out = layer(x)
        expected = F.linear(x.float(), portable.dequantize().float())
        error = (out.float() - expected).norm() / expected.norm()
        assert out.shape == (rows, 768) and error < 1e-2
