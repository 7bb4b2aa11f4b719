"""LoRA adapters in PEFT's format: save, load, merge into an HF checkpoint, serve several at once."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from levante.bundle import Bundle
from levante.config import ModelConfig
from levante.errors import ModelFileError, RequestError
from levante.kinds import WeightFormat
from levante.model import Transformer
from levante.tokenizer import HFTokenizer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's key prefix on the saved weights
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "tekken.json", "tokenizer.model", "chat_template.jinja",
                      "generation_config.json")


def save_adapter(peft_model: PeftModel, out_dir: Path, *, base_ref: str) -> Path:
    """Write adapter_config.json + adapter_model.safetensors that HF peft loads on the HF base.

    Keys are peft's (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) because
    our module names are HF's. We train without a peft task type (ours is not an HF model);
    the saved config says CAUSAL_LM so `PeftModel.from_pretrained(LlamaForCausalLM...)` builds
    a model that can `generate`.
    """
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir))
    config_path = out_dir / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config.update(task_type="CAUSAL_LM", base_model_name_or_path=base_ref)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def adapter_config(path: Path) -> LoraConfig:
    """The LoraConfig of a saved adapter, checked for what Levante supports."""
    path = Path(path)
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ModelFileError(path, f"not a PEFT adapter folder: no {ADAPTER_CONFIG}")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(config_path, f"cannot read JSON ({e})") from None
    if raw.get("peft_type") != "LORA":
        raise ModelFileError(config_path, f"peft_type is {raw.get('peft_type')!r}, expected LORA")
    for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise ModelFileError(config_path, f"{key} is not supported by Levante")
    if raw.get("lora_bias"):
        raise ModelFileError(config_path, "lora_bias is not supported by Levante")
    config = LoraConfig.from_pretrained(str(path))
    config.task_type = None  # our Transformer has no HF generation hooks; see save_adapter
    return config


def load_adapter(model: Transformer, path: Path, *, is_trainable: bool = False) -> PeftModel:
    """Apply a saved adapter to `model` in place through peft (for training on or merging)."""
    return PeftModel.from_pretrained(model, str(path), config=adapter_config(path),
                                     is_trainable=is_trainable)


def hf_config(config: ModelConfig, *, architecture: str = "LlamaForCausalLM",
              dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A transformers config.json for `config` (Llama or Mistral: same weights, same names)."""
    model_type = "mistral" if architecture.startswith("Mistral") else "llama"
    hf: dict[str, Any] = {
        "architectures": [architecture], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "rope_theta": config.rope_theta,
        "rms_norm_eps": config.norm_eps, "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": config.bos_id,
        "eos_token_id": list(config.eos_ids) if len(config.eos_ids) > 1
        else (config.eos_ids[0] if config.eos_ids else None),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "mistral":
        hf["sliding_window"] = None
    return hf


def save_merged(model: Transformer, source: Bundle, out_dir: Path) -> Path:
    """Write an HF checkpoint folder (config.json, model.safetensors, tokenizer files).

    `model` is the base with the adapter merged in (`PeftModel.merge_and_unload()`); tokenizer
    files come from `source`: copied from an HF or Mistral folder, rebuilt from a GGUF.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as the embedding; HF re-ties it
    dtype = state["model.norm.weight"].dtype
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    is_mistral = (source.format == WeightFormat.SAFETENSORS_CONSOLIDATED
                  or (source.path / "tekken.json").exists())
    architecture = _source_architecture(source) or (
        "MistralForCausalLM" if is_mistral else "LlamaForCausalLM")
    config = hf_config(model.config, architecture=architecture, dtype=dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if source.format == WeightFormat.GGUF:
        _write_gguf_tokenizer(source, out_dir)
    else:
        for name in HF_TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copy(source.path / name, out_dir / name)
    return out_dir


def _source_architecture(source: Bundle) -> str | None:
    config_path = source.path / "config.json"
    if source.format != WeightFormat.SAFETENSORS_HF or not config_path.is_file():
        return None
    architectures = json.loads(config_path.read_text()).get("architectures") or [None]
    return str(architectures[0]) if architectures[0] else None


def _write_gguf_tokenizer(source: Bundle, out_dir: Path) -> None:
    """tokenizer.json and tokenizer_config.json (with the chat template) from a GGUF's vocab."""
    from levante.weights.gguf import GGUFFile

    if not isinstance(source.tokenizer, HFTokenizer):
        raise ModelFileError(source.path, "GGUF tokenizer is not a HF tokenizers vocabulary")
    tokenizer = source.tokenizer
    tokenizer.backend.save(str(out_dir / "tokenizer.json"))
    meta = GGUFFile(source.path).metadata

    def token(token_id: int | None) -> str | None:
        return None if token_id is None else tokenizer.token_text(token_id)

    config = {"bos_token": token(tokenizer.bos_id),
              "eos_token": token(min(tokenizer.eos_ids)) if tokenizer.eos_ids else None,
              "add_bos_token": tokenizer.should_add_bos,
              "chat_template": meta.get("tokenizer.chat_template")}
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if v is not None}, indent=2))


@dataclass(frozen=True)
class LoRAWeights:
    """One adapter as plain tensors: module path -> (A [r, in], B [out, r] x scale)."""

    path: Path
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_adapter(path: Path) -> LoRAWeights:
    """Read a PEFT LoRA folder; B is pre-multiplied by alpha/r (alpha/sqrt(r) with rsLoRA)."""
    path = Path(path)
    config = adapter_config(path)
    scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    weights_path = path / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as e:
        raise ModelFileError(weights_path, f"cannot read adapter weights ({e})") from None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        body, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or kind not in ("A.weight", "B.weight"):
            raise ModelFileError(weights_path, f"unexpected tensor {key!r} (want "
                                 f"{PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        modules.setdefault(body, {})[kind[0]] = tensor
    pairs = {}
    for name, pair in modules.items():
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
            raise ModelFileError(weights_path, f"{name}: needs lora_A [r, in] and lora_B [out, r]")
        pairs[name] = (pair["A"].float(), pair["B"].float() * scale)
    return LoRAWeights(path, pairs)


class AdapterContext:
    """Which adapter each token of the current step uses; shared by a model's MultiLoRALinears."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None  # the token index's shape, x.shape[:-1]
        self.groups: list[tuple[int, torch.Tensor]] = []  # (adapter id, flat rows), id >= 1


class MultiLoRALinear(nn.Module):
    """A base linear plus stacked LoRA pairs; each token gets base(x) + its adapter's delta.

    lora_a: [N+1, r_max, in], lora_b: [N+1, out, r_max] (B scaled), slot 0 is the base (zeros),
    ranks padded with zeros to r_max (exact). Tokens are grouped by adapter, two small matmuls
    per adapter present in the step.
    """

    def __init__(self, base_layer: nn.Module, context: AdapterContext, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, adapter_ids: frozenset[int]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)
        self.adapter_ids = adapter_ids  # slots that hold weights for this module
        self._f64: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.context.groups:
            return out
        assert tuple(x.shape[:-1]) == self.context.shape, "token adapter index does not match x"
        flat_x = x.reshape(-1, x.shape[-1])  # [T, in]
        flat_out = out.view(-1, out.shape[-1])  # [T, out], writes land in `out`
        for adapter_id, rows in self.context.groups:
            if adapter_id in self.adapter_ids:
                lora_a, lora_b = self._pair(adapter_id, x.device)
                low = flat_x[rows].to(lora_a.dtype) @ lora_a.T  # [n, r_max]
                flat_out.index_add_(0, rows, (low @ lora_b.T).to(out.dtype))
        return out

    def _pair(self, adapter_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's A and B; on the CPU in float64 (copies made once). A float32 matmul
        rounds differently with the number of rows (1-4 rows vs 17: ~500 of 576 outputs
        differ here), so a token's delta would depend on its batch; in float64 the sums agree
        to far below float32's last bit, and the one rounding to float32 makes a row's result
        the same at any batch size (engine batch invariance, with the quantized kernels)."""
        if device.type != "cpu":
            return self.lora_a[adapter_id], self.lora_b[adapter_id]
        key = (adapter_id, self.lora_a.data_ptr(), self.lora_b.data_ptr())
        cached = self._f64.get(key)
        if cached is None:
            cached = (self.lora_a[adapter_id].double(), self.lora_b[adapter_id].double())
            self._f64 = {k: v for k, v in self._f64.items() if k[1:] == key[1:]}
            self._f64[key] = cached
        return cached


class AdapterSet:
    """Adapters attached to one model; before each forward, say which adapter each token uses."""

    def __init__(self, model: Transformer, names: Sequence[str], context: AdapterContext,
                 originals: dict[str, nn.Module]) -> None:
        self.model = model
        self.names = tuple(names)  # adapter id i + 1 is names[i]; id 0 is the base
        self.context = context
        self._originals = originals
        self._device = model.model.norm.weight.device

    def index_of(self, name: str | None) -> int:
        """Adapter id of a served name; None is the base model (id 0)."""
        if name is None:
            return 0
        if name not in self.names:
            raise RequestError(f"unknown adapter {name!r}; served: {', '.join(self.names)}",
                               param="model", code="model_not_found")
        return self.names.index(name) + 1

    def set_token_adapters(self, index: torch.Tensor) -> None:
        """Adapter id per token for the next forward: [T] (engine) or [B, S]; 0 = base."""
        flat = index.to(device=self._device, dtype=torch.long).reshape(-1)
        present = torch.unique(flat).tolist()
        if present and not 0 <= min(present) <= max(present) <= len(self.names):
            raise ValueError(f"adapter ids must be in [0, {len(self.names)}], got {present}")
        self.context.shape = tuple(index.shape)
        self.context.groups = [(a, (flat == a).nonzero().squeeze(1)) for a in present if a]

    def set_batch(self, adapter_ids: Sequence[int], num_tokens: Sequence[int]) -> None:
        """Per request: its adapter id and how many tokens it has in the flattened step."""
        counts = torch.tensor(num_tokens, dtype=torch.long)
        self.set_token_adapters(torch.tensor(adapter_ids, dtype=torch.long)
                                .repeat_interleave(counts))

    def clear(self) -> None:
        """Every token uses the base model until the next `set_*`."""
        self.context.shape, self.context.groups = None, []

    def detach(self) -> None:
        """Put the original linears back."""
        for name, module in self._originals.items():
            self.model.set_submodule(name, module)
        self.clear()


def attach_adapters(model: Transformer, adapters: dict[str, Path]) -> AdapterSet:
    """Swap each targeted linear of `model` for a MultiLoRALinear holding every adapter's pair.

    Attach after any quantization (the wrapper calls whatever base layer it finds). Adapters
    may target only linears inside the decoder layers, so one per-token index serves them all.
    """
    weights = [read_adapter(path) for path in adapters.values()]
    model.unfuse_projections()  # the wrappers replace the parts a fused matmul would skip
    dtype = model.model.norm.weight.dtype
    context = AdapterContext()
    originals: dict[str, nn.Module] = {}
    for name in sorted({n for w in weights for n in w.modules}):
        base = _target(model, name, weights)
        pairs = {i + 1: w.modules[name] for i, w in enumerate(weights) if name in w.modules}
        a0, b0 = next(iter(pairs.values()))
        r_max = max(a.shape[0] for a, _ in pairs.values())
        lora_a = torch.zeros(len(weights) + 1, r_max, a0.shape[1], dtype=dtype)
        lora_b = torch.zeros(len(weights) + 1, b0.shape[0], r_max, dtype=dtype)
        for slot, (a, b) in pairs.items():
            _check_shape(weights[slot - 1].path, name, base, a, b)
            lora_a[slot, :a.shape[0]] = a
            lora_b[slot, :, :a.shape[0]] = b
        device = model.model.norm.weight.device
        originals[name] = base
        model.set_submodule(name, MultiLoRALinear(base, context, lora_a.to(device),
                                                  lora_b.to(device), frozenset(pairs)))
    return AdapterSet(model, list(adapters), context, originals)


def _target(model: Transformer, name: str, weights: list[LoRAWeights]) -> nn.Module:
    where = next(w.path for w in weights if name in w.modules)
    if not name.startswith("model.layers."):
        raise ModelFileError(where, f"adapter targets {name!r}; only linears inside decoder "
                             "layers can be served per token")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelFileError(where, f"adapter targets {name!r}, which this model lacks") from None


def _check_shape(path: Path, name: str, base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    in_features = getattr(base, "in_features", a.shape[1])
    out_features = getattr(base, "out_features", b.shape[0])
    if (a.shape[1], b.shape[0]) != (in_features, out_features):
        raise ModelFileError(path, f"{name}: adapter is {a.shape[1]} -> {b.shape[0]}, the model's "
                             f"linear is {in_features} -> {out_features} (another base model?)")
