"""LoadConfig: validation, device choice, and the checkpoint's own precision at load."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from levante.bundle import checkpoint_dtype, load
from levante.errors import ConfigError
from levante.load_config import LoadConfig


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine, as PyTorch would see it without CUDA or MPS (whatever it really has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture(scope="module")
def tiny_mistral_bf16(tmp_path_factory: pytest.TempPathFactory, tiny_mistral_hf: Path) -> Path:
    """`tiny_mistral_hf`'s model saved in bfloat16, as Mistral's own checkpoints are."""
    from transformers import MistralForCausalLM

    folder = tmp_path_factory.mktemp("tiny-mistral-bf16")
    model = MistralForCausalLM.from_pretrained(tiny_mistral_hf, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    shutil.copy(tiny_mistral_hf / "tekken.json", folder / "tekken.json")
    return folder


@pytest.mark.parametrize(("field", "value"), [
    ("device", "gpu"), ("device", "cuda:x"), ("device", ""), ("device", "CPU"),
    ("dtype", "fp32"), ("dtype", "float64"), ("quant", "q9"), ("kv_cache_dtype", "fp8"),
    ("max_model_len", 0), ("max_model_len", True), ("kv_cache_memory", -1),
    ("kv_cache_memory", 1.5),
])
def test_bad_values_are_named(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"LoadConfig\.{field} .*{value!r}"):
        LoadConfig(**{field: value})


def test_good_values_and_defaults() -> None:
    assert LoadConfig() == LoadConfig(device="auto", dtype="auto", quant="auto",
                                      kv_cache_dtype="auto")
    for device in ("cpu", "cuda", "cuda:1", "mps"):
        assert LoadConfig(device=device).device == device
    config = LoadConfig(dtype="bfloat16", kv_cache_dtype="float16", max_model_len=128,
                        kv_cache_memory=2**20)
    assert config.torch_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="auto"):
        _ = LoadConfig().torch_dtype


def test_auto_picks_the_cpu_here_and_says_so(no_gpu: None,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="levante.load_config"):
        assert LoadConfig().on_device().device == "cpu"
    assert "device auto: cpu" in caplog.text


def test_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert LoadConfig().on_device().device == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Test GPU")
    assert LoadConfig().on_device().device == "cuda"


def test_missing_devices_are_refused_by_name(no_gpu: None) -> None:
    with pytest.raises(ConfigError, match="device cuda: no CUDA GPU"):
        LoadConfig(device="cuda").on_device()
    with pytest.raises(ConfigError, match="device cuda:1: no CUDA GPU"):
        LoadConfig(device="cuda:1").on_device()
    with pytest.raises(ConfigError, match="device mps: .*Apple GPU"):
        LoadConfig(device="mps").on_device()


def test_cuda_without_a_gpu_fails_before_the_model_is_read(
        no_gpu: None, tiny_mistral_hf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were read")

    monkeypatch.setattr("levante.bundle.resolve", no_reading)
    monkeypatch.setattr("levante.bundle.load_safetensors_state_dict", no_reading)
    with pytest.raises(ConfigError, match="device cuda"):
        load(str(tiny_mistral_hf), LoadConfig(device="cuda"))


def test_dtype_auto_resolution_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = LoadConfig(device="cpu")
    assert cpu.with_dtype(torch.bfloat16).dtype == "bfloat16"
    assert cpu.with_dtype(None).dtype == "float32"  # quantized blocks, dequantized on the CPU
    assert cpu.replace(dtype="float32").with_dtype(torch.bfloat16).dtype == "float32"
    assert cpu.with_dtype(torch.float32).dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert LoadConfig(device="cuda").with_dtype(None).dtype == "bfloat16"
    # a float32 checkpoint on a GPU: its 16-bit type unless float32 is asked for
    assert LoadConfig(device="cuda").with_dtype(torch.float32).dtype == "bfloat16"
    assert LoadConfig(device="cuda", dtype="float32").with_dtype(torch.float32).dtype == "float32"
    assert LoadConfig(device="cuda").with_dtype(torch.float16).dtype == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Old GPU")
    assert LoadConfig(device="cuda").with_dtype(None).dtype == "float16"
    with pytest.raises(ConfigError, match="Old GPU has no bfloat16"):
        LoadConfig(device="cuda").with_dtype(torch.bfloat16)


def test_keyword_form_of_load_builds_the_same_config(tiny_mistral_hf: Path) -> None:
    bundle = load(str(tiny_mistral_hf), dtype=torch.float32, device="cpu", max_seq_len=64)
    assert bundle.load_config == LoadConfig(device="cpu", dtype="float32", quant="none",
                                            max_model_len=64)
    with pytest.raises(ConfigError, match="not both"):
        load(str(tiny_mistral_hf), LoadConfig(), dtype=torch.float32)


def test_bf16_checkpoint_stays_bf16_and_matches_transformers(tiny_mistral_bf16: Path) -> None:
    from transformers import MistralForCausalLM

    assert checkpoint_dtype(tiny_mistral_bf16) == torch.bfloat16
    bundle = load(str(tiny_mistral_bf16), LoadConfig(device="cpu"))
    assert bundle.load_config.dtype == "bfloat16"
    assert {p.dtype for p in bundle.model.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, bundle.config.vocab_size, (2, 37),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = bundle.model.logits(bundle.model(ids))
        hf_bf16 = MistralForCausalLM.from_pretrained(tiny_mistral_bf16, dtype=torch.bfloat16)
        same_dtype = hf_bf16.eval()(ids).logits.float()
        hf_fp32 = MistralForCausalLM.from_pretrained(tiny_mistral_bf16, dtype=torch.float32)
        exact = hf_fp32.eval()(ids).logits
    assert (got - same_dtype).abs().max().item() <= 0.03  # ~2 bf16 steps at |logit| ~2
    # As close to the float32 computation as transformers' own bf16 model is.
    assert (got - exact).abs().max() <= 1.5 * (same_dtype - exact).abs().max() + 1e-3


def test_float32_only_on_request(tiny_mistral_bf16: Path) -> None:
    from transformers import MistralForCausalLM

    bundle = load(str(tiny_mistral_bf16), LoadConfig(device="cpu", dtype="float32"))
    assert {p.dtype for p in bundle.model.parameters()} == {torch.float32}
    ids = torch.randint(0, bundle.config.vocab_size, (1, 23),
                        generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = bundle.model.logits(bundle.model(ids))
        hf = MistralForCausalLM.from_pretrained(tiny_mistral_bf16, dtype=torch.float32).eval()
        assert (got - hf(ids).logits).abs().max().item() <= 1e-4


def test_rms_norm_in_bf16_matches_transformers() -> None:
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    from levante.model import RMSNorm

    torch.manual_seed(0)
    x = (torch.randn(4, 7, 320) * 30).bfloat16()  # large activations: float32 inside matters
    ours, theirs = RMSNorm(320, 1e-5), MistralRMSNorm(320, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(320) + 0.5)
        theirs.weight.copy_(ours.weight)
    ours, theirs = ours.bfloat16(), theirs.bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_server_state_loads_on_the_configured_device(tiny_mistral_hf: Path,
                                                     no_gpu: None) -> None:
    from levante.server.config import ServerConfig
    from levante.server.routes import ServerState

    state = ServerState.build(ServerConfig(ref=str(tiny_mistral_hf), device="cpu",
                                           max_model_len=64, num_kv_blocks=8))
    assert state.bundle.load_config.device == "cpu"
    assert state.bundle.model.lm_head.weight.device.type == "cpu"
    with pytest.raises(ConfigError, match="device cuda: no CUDA GPU"):
        ServerState.build(ServerConfig(ref=str(tiny_mistral_hf), device="cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine "
                    "without CUDA")
def test_generate_on_cuda_without_one_fails_fast(tiny_mistral_hf: Path) -> None:
    from levante.cli import app

    result = CliRunner().invoke(app, ["generate", str(tiny_mistral_hf), "--prompt", "hi",
                                      "--device", "cuda"])
    assert result.exit_code == 1
    assert "device cuda: no CUDA GPU" in result.output and "Traceback" not in result.output


def test_gguf_blocks_keep_float32_activations(smollm2_gguf: Path) -> None:
    """A quantized GGUF computes from its blocks on the CPU, activations in float32."""
    bundle = load(str(smollm2_gguf), LoadConfig(device="cpu", max_model_len=256))
    assert bundle.load_config.quant == "gguf" and bundle.load_config.dtype == "float32"
    assert checkpoint_dtype(smollm2_gguf) is None


@pytest.mark.parametrize("layout", ["hf", "consolidated"])
def test_joined_projections_are_read_once_and_fused_without_a_copy(
        layout: str, tiny_mistral_hf: Path, tiny_mistral_consolidated: Path) -> None:
    """q/k/v and gate/up are read as consecutive rows of one buffer; fusing them then
    copies nothing, and the model still computes what transformers does."""
    from transformers import MistralForCausalLM

    folder = tiny_mistral_hf if layout == "hf" else tiny_mistral_consolidated
    model = load(str(folder), LoadConfig(device="cpu")).model
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    assert k.data_ptr() == q.data_ptr() + q.nbytes and v.data_ptr() == k.data_ptr() + k.nbytes
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_proj.weight.data_ptr() + \
        mlp.gate_proj.weight.nbytes
    assert model.fuse_projections() == 2 * model.config.num_layers
    assert attn.joined().weight.data_ptr() == q.data_ptr()  # a view, not a copy
    assert mlp.joined().weight.data_ptr() == mlp.gate_proj.weight.data_ptr()
    ids = torch.randint(0, model.config.vocab_size, (1, 19),
                        generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = MistralForCausalLM.from_pretrained(tiny_mistral_hf, dtype=torch.float32)
        assert (model.logits(model(ids)) - expected.eval()(ids).logits).abs().max() <= 1e-4


def test_weights_as_stored_and_converted_equal_the_file(tiny_mistral_hf: Path) -> None:
    """Tensors kept as stored (mapped) and converted ones (plain reads) equal the file."""
    from safetensors import safe_open

    with safe_open(tiny_mistral_hf / "model.safetensors", framework="pt") as f:
        stored = f.get_tensor("model.layers.0.self_attn.o_proj.weight")
    as_stored = load(str(tiny_mistral_hf), LoadConfig(device="cpu")).model
    converted = load(str(tiny_mistral_hf), LoadConfig(device="cpu", dtype="bfloat16")).model
    o_proj = as_stored.model.layers[0].self_attn.o_proj.weight
    assert torch.equal(o_proj, stored)
    assert torch.equal(converted.model.layers[0].self_attn.o_proj.weight, stored.bfloat16())
    assert converted.model.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16


class _Stop(Exception):
    """Raised by a stand-in loader to end a load once its arguments are known."""


def test_gguf_on_a_gpu_is_dequantized_to_its_dtype_and_says_so(
        smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    seen: list[torch.dtype] = []

    def dequantize(gguf_file: object, config: object, dtype: torch.dtype) -> None:
        seen.append(dtype)
        raise _Stop

    monkeypatch.setattr("levante.bundle.load_gguf_state_dict", dequantize)
    with caplog.at_level(logging.INFO, logger="levante.bundle"), pytest.raises(_Stop):
        load(str(smollm2_gguf), LoadConfig(device="cuda"))
    assert seen == [torch.bfloat16]
    assert "GGUF blocks dequantized to bfloat16 on cuda" in caplog.text
    with pytest.raises(ConfigError, match="--quant gguf computes with CPU kernels"):
        load(str(smollm2_gguf), LoadConfig(device="cuda", quant="gguf"))


def test_llm_takes_a_load_config_or_its_keywords(tiny_mistral_hf: Path) -> None:
    from levante.llm import LLM

    with pytest.raises(ConfigError, match="not both"):
        LLM(str(tiny_mistral_hf), load_config=LoadConfig(), dtype="float32")
    with pytest.raises(ConfigError, match=r"LoadConfig\.dtype .*'fp16'"):
        LLM(str(tiny_mistral_hf), dtype="fp16")
    llm = LLM(str(tiny_mistral_hf), device="cpu", max_model_len=64, kv_cache_memory=2**20)
    assert llm.bundle.load_config.max_model_len == 64 and llm.bundle.config.max_seq_len == 64
    assert llm.engine.config.kv_cache_memory == 2**20
