"""What Ollama's /api/tags, /api/show and /api/ps say about the served model (from its files)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from levante.chat import ChatFormat, JinjaChatFormat, MistralChatFormat
from levante.chat.fim import supports_fim
from levante.engine.kv_cache import KVCache
from levante.kinds import WeightFormat
from levante.server.ollama_protocol import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, tagged
from levante.tokenizer import Tokenizer

if TYPE_CHECKING:
    from levante.server.ollama_aliases import Alias
    from levante.server.routes import ServerState

# /api/ps `expires_at`: the served model stays loaded for the life of the server.
NEVER_EXPIRES = "9999-12-31T23:59:59Z"


def file_size(path: Path) -> int:
    """Bytes of a model file, or of the files in a model folder (links followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def parameter_size(num_params: int) -> str:
    """Ollama's short count: 134_515_008 -> "134.52M", 23_572_403_200 -> "23.6B"."""
    if num_params >= 10**9:
        return f"{num_params / 1e9:.1f}B"
    return f"{num_params / 1e6:.2f}M"


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat().replace("+00:00", "Z")


def _file_facts(path: Path, fmt: WeightFormat, dtype: str) -> tuple[str, str, str, dict[str, Any]]:
    """(architecture, quantization level, chat template, file metadata) from a GGUF's metadata
    or a folder's config.json; a Mistral consolidated folder is "mistral" with no template
    file. The metadata is what Ollama's `model_info` lists: a GGUF's keys less `general.name`
    and the template, arrays as null (Ollama reads none of their values unless verbose)."""
    if fmt == WeightFormat.GGUF:
        from gguf import LlamaFileType

        from levante.weights.gguf import GGUFFile

        meta = GGUFFile(path).metadata
        file_type = meta.get("general.file_type")
        quant = (LlamaFileType(file_type).name.removeprefix("MOSTLY_")
                 if isinstance(file_type, int) else dtype)
        info = {k: None if isinstance(v, list) else v for k, v in meta.items()
                if k not in ("general.name", "tokenizer.chat_template")}
        return str(meta["general.architecture"]), quant, str(
            meta.get("tokenizer.chat_template", "")), info
    if fmt == WeightFormat.SAFETENSORS_HF:
        config = json.loads((path / "config.json").read_text())
        return str(config.get("model_type", "llama")), dtype, "", {}
    return "mistral", dtype, "", {}


# /api/show `template` for Mistral's V7 format, which mistral-common builds (no template text).
MISTRAL_V7_NOTE = ("# Mistral V7 instruct format ([SYSTEM_PROMPT] [INST] [AVAILABLE_TOOLS] ...), "
                   "built by mistral-common from tekken.json; there is no template text")


def template_text(file_template: str, chat_format: ChatFormat | None) -> str:
    """The chat template /api/show reports: the file's, the Jinja source the server renders,
    or a note for Mistral's V7 format."""
    if isinstance(chat_format, MistralChatFormat):
        return MISTRAL_V7_NOTE
    if not file_template and isinstance(chat_format, JinjaChatFormat):
        return chat_format.source
    return file_template


def capabilities(chat_format: ChatFormat | None, tokenizer: Tokenizer) -> list[str]:
    """Ollama's `capabilities` for a generative model: "completion", and "tools" where the chat
    format takes tools: Mistral's V7, or a template that mentions "tools" or "tool_call" (the
    test Ollama applies to a template); "insert" where the tokenizer has a fill-in-the-middle
    format (Ollama's test is a template mentioning .Suffix; ours builds the prompt, chat.fim).
    Never "embedding" (Ollama lists it only for a GGUF with a `pooling_type`)."""
    found = ["completion"]
    if isinstance(chat_format, MistralChatFormat) or (
            isinstance(chat_format, JinjaChatFormat)
            and ("tools" in chat_format.source or "tool_call" in chat_format.source)):
        found.append("tools")
    if supports_fim(tokenizer):
        found.append("insert")
    return found


@dataclass(frozen=True)
class ModelFacts:
    """The served model as Ollama describes a model: name, size, digest, details, model_info."""

    state: ServerState
    name: str  # "smollm2:latest"
    size_bytes: int
    modified_at: str
    digest: str
    architecture: str
    quantization_level: str
    template: str
    file_info: dict[str, Any]  # a GGUF's metadata, as `model_info` lists it

    @classmethod
    def read(cls, state: ServerState) -> ModelFacts:
        """Read the facts once, when the routes are registered."""
        bundle = state.bundle
        stat = bundle.path.stat()
        size = file_size(bundle.path)
        dtype = str(bundle.model.model.embed_tokens.weight.dtype).removeprefix("torch.")
        dtype = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(dtype, dtype)
        architecture, quant, template, info = _file_facts(bundle.path, bundle.format, dtype)
        # Identifies this file as it is on disk (path, size, mtime), without hashing gigabytes;
        # not the sha256 of its content that Ollama's digests are.
        digest = hashlib.sha256(f"{bundle.path}|{size}|{stat.st_mtime_ns}".encode()).hexdigest()
        return cls(state, tagged(state.model_names[0]), size, _rfc3339(stat.st_mtime), digest,
                   architecture, quant, template, info)

    def details(self) -> dict[str, Any]:
        """Ollama's `details` object."""
        return {"parent_model": "", "format": self.state.bundle.format.split("-")[0],
                "family": self.architecture, "families": [self.architecture],
                "parameter_size": parameter_size(self.state.bundle.config.num_params),
                "quantization_level": self.quantization_level}

    def listing(self, alias: Alias | None = None) -> dict[str, Any]:
        """One entry of /api/tags: the served model, or a name made for it (the same file)."""
        name = alias.name if alias else self.name
        modified = (alias.modified_at if alias else None) or self.modified_at
        return {"name": name, "model": name, "modified_at": modified,
                "size": self.size_bytes, "digest": self.digest, "details": self.details()}

    def running(self) -> dict[str, Any]:
        """One entry of /api/ps: memory held now (weights and the KV pool)."""
        engine = self.state.engine.engine
        model = engine.model
        weights = sum(t.numel() * t.element_size()
                      for t in [*model.parameters(), *model.buffers()])
        kv = engine.pool.num_blocks * KVCache.bytes_per_block(
            model.config, engine.config.block_size, engine.runner.cache.kv_dtype)
        size = weights + kv
        on_gpu = model.rope_cos.device.type == "cuda"
        return {"name": self.name, "model": self.name, "size": size, "digest": self.digest,
                "details": self.details(), "expires_at": NEVER_EXPIRES,
                "size_vram": size if on_gpu else 0,
                "context_length": self.state.bundle.config.max_seq_len}

    def model_info(self) -> dict[str, Any]:
        """GGUF-style keys, as Ollama's `model_info`: the file's metadata, then the loaded
        config's numbers over it. So `<arch>.context_length` is the context this server runs
        (`--max-model-len`), which clients size their prompts by, not the trained one."""
        c, a = self.state.bundle.config, self.architecture
        return {**self.file_info, "general.architecture": a, "general.parameter_count": c.num_params,
                f"{a}.context_length": c.max_seq_len, f"{a}.embedding_length": c.dim,
                f"{a}.block_count": c.num_layers, f"{a}.feed_forward_length": c.ffn_dim,
                f"{a}.attention.head_count": c.num_heads,
                f"{a}.attention.head_count_kv": c.num_kv_heads,
                f"{a}.attention.key_length": c.head_dim, f"{a}.rope.freq_base": c.rope_theta,
                f"{a}.attention.layer_norm_rms_epsilon": c.norm_eps, f"{a}.vocab_size":
                c.vocab_size}

    def show(self, alias: Alias) -> dict[str, Any]:
        """The /api/show object: the defaults a request gets (a made name's over the
        server's), as Modelfile parameters, and a made name's system prompt."""
        defaults: dict[str, Any] = {
            "temperature": DEFAULT_TEMPERATURE, "top_k": DEFAULT_TOP_K, "top_p": DEFAULT_TOP_P,
            "num_ctx": self.state.bundle.config.max_seq_len, **alias.options}
        lines = [(k, v) for k, value in defaults.items()
                 for v in (value if isinstance(value, list) else [value])]
        parameters = "\n".join(f"{k:<30} {json.dumps(v) if isinstance(v, str) else v}"
                               for k, v in lines)
        system = f'SYSTEM """{alias.system}"""\n' if alias.system else ""
        modelfile = (f"# Served by Levante\nFROM {self.state.bundle.path}\n" + system
                     + "".join(f"PARAMETER {k} {json.dumps(v) if isinstance(v, str) else v}\n"
                               for k, v in lines))
        template = template_text(self.template, self.state.bundle.chat_format)
        shown = {"modelfile": modelfile, "parameters": parameters, "template": template,
                 "details": self.details(), "model_info": self.model_info(),
                 "capabilities": capabilities(self.state.bundle.chat_format,
                                               self.state.bundle.tokenizer),
                 "modified_at": alias.modified_at or self.modified_at}
        return {**shown, "system": alias.system} if alias.system else shown
