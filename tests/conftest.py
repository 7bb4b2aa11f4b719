"""Shared fixtures: the real SmolLM2 GGUF, Mistral's Tekken file, tiny random models."""

from __future__ import annotations

import functools
import gc
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from levante.heap import release_free_memory

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SLOW_TESTS = Path(__file__).with_name("slow_tests.txt")  # written by tests/make_tiers.py


@functools.cache  # read once per run: pytest_ignore_collect asks for every file
def _listed_slow() -> frozenset[str]:
    listed = {line.split("#")[0].strip() for line in SLOW_TESTS.read_text().splitlines()}
    listed.discard("")
    return frozenset(listed)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """In the fast tier (`-m "not slow"`, the default), a file the slow tier takes whole (listed
    in slow_tests.txt, or slow by its module mark) is not even imported: importing test modules
    (PyTorch, transformers, peft, Ray, the openai client) was a large part of the fast tier's
    time, for tests it then deselected."""
    if config.getoption("markexpr") != "not slow" or collection_path.suffix != ".py":
        return None
    try:
        relative = collection_path.relative_to(config.rootpath).as_posix()
    except ValueError:  # a file outside the repository
        return None
    if relative in _listed_slow() or _SLOW_MODULE.search(collection_path.read_text()):
        return True
    return None


# A module-wide slow mark (`pytestmark = pytest.mark.slow`, or a list holding it), read as text.
_SLOW_MODULE = re.compile(r"^pytestmark = .*\bpytest\.mark\.slow\b", re.MULTILINE)


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests slow_tests.txt lists (node ids, or whole files) slow."""
    listed = _listed_slow()
    for item in items:
        if item.nodeid in listed or item.nodeid.split("::")[0] in listed:
            item.add_marker(pytest.mark.slow)


# httpx's calls wait 5 s for a response by default: a 96-token completion on a loaded 2-core
# machine took longer (a slow-tier ReadTimeout, not a server fault). Tests that mean a bound
# pass their own timeout; the rest get a generous one, set once here instead of at each call.
TEST_HTTP_TIMEOUT_S = 120.0


def pytest_configure(config: pytest.Config) -> None:
    import httpx

    timeout = httpx.Timeout(TEST_HTTP_TIMEOUT_S)
    functions = [httpx.request, httpx.get, httpx.post, httpx.put, httpx.patch, httpx.delete,
                 httpx.head, httpx.options, httpx.stream.__wrapped__,  # type: ignore[attr-defined]
                 httpx.Client.__init__, httpx.AsyncClient.__init__]
    for function in functions:
        assert "timeout" in function.__kwdefaults__, function
        function.__kwdefaults__["timeout"] = timeout


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_module() -> Iterator[None]:
    """Collect the module's models (reference cycles keep some alive) and hand freed heap
    back to the OS, so one process running the whole suite does not grow module by module."""
    yield
    gc.collect()
    release_free_memory()  # a no-op off glibc (macOS)


def levante_home() -> Path:
    return Path(os.environ.get("LEVANTE_HOME", Path.home() / ".cache" / "levante"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF file (pulled by `make test` before pytest starts)."""
    path = levante_home() / "models" / "smollm2" / SMOLLM2_FILE
    if not path.exists():
        from levante.weights.hub import pull

        pull("smollm2")
    assert path.exists(), f"{path} missing after pull"
    return path


@pytest.fixture(scope="session")
def tekken_path() -> Path:
    """Mistral's Tekken tokenizer file as shipped in mistral-common (131072-token vocab)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


# Mistral Small 3's shape ratios, scaled down: head_dim 128 (so q width != dim), 4:1 GQA,
# rope theta 1e8, the real 131072-token Tekken vocabulary, untied output, 2 layers.
TINY_MISTRAL = dict(vocab_size=131072, hidden_size=320, intermediate_size=1024,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                    head_dim=128, rope_theta=100_000_000.0, rms_norm_eps=1e-5,
                    max_position_embeddings=32768, tie_word_embeddings=False,
                    sliding_window=None, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="session")
def tiny_mistral_hf(tmp_path_factory: pytest.TempPathFactory, tekken_path: Path) -> Path:
    """An HF folder (config.json, model.safetensors, tekken.json) of a random tiny Mistral."""
    import shutil

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    folder = tmp_path_factory.mktemp("tiny-mistral-hf")
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY_MISTRAL)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(tekken_path, folder / "tekken.json")
    return folder


@pytest.fixture(scope="session")
def tiny_mistral_consolidated(tmp_path_factory: pytest.TempPathFactory, tiny_mistral_hf: Path,
                              tekken_path: Path) -> Path:
    """The same weights as `tiny_mistral_hf`, written as Mistral's consolidated format."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from levante.weights.layout import (
        CONSOLIDATED_GLOBAL_NAMES,
        CONSOLIDATED_LAYER_NAMES,
        half_to_interleaved,
    )

    c = TINY_MISTRAL
    folder = tmp_path_factory.mktemp("tiny-mistral-consolidated")
    to_mistral = {v: k for k, v in CONSOLIDATED_GLOBAL_NAMES.items()}
    layer_to_mistral = {v: k for k, v in CONSOLIDATED_LAYER_NAMES.items()}
    out = {}
    for name, tensor in load_file(tiny_mistral_hf / "model.safetensors").items():
        if name in to_mistral:
            out[to_mistral[name]] = tensor
            continue
        _, _, index, rest = name.split(".", 3)
        if rest == "self_attn.q_proj.weight":
            tensor = half_to_interleaved(tensor, c["num_attention_heads"])
        elif rest == "self_attn.k_proj.weight":
            tensor = half_to_interleaved(tensor, c["num_key_value_heads"])
        out[f"layers.{index}.{layer_to_mistral[rest]}"] = tensor.contiguous()
    save_file(out, folder / "consolidated.safetensors")
    params = {"dim": c["hidden_size"], "n_layers": c["num_hidden_layers"],
              "head_dim": c["head_dim"], "hidden_dim": c["intermediate_size"],
              "n_heads": c["num_attention_heads"], "n_kv_heads": c["num_key_value_heads"],
              "rope_theta": c["rope_theta"], "norm_eps": c["rms_norm_eps"],
              "vocab_size": c["vocab_size"]}
    (folder / "params.json").write_text(json.dumps(params))
    shutil.copy(tekken_path, folder / "tekken.json")
    return folder


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf: Path):
    """(model, tokenizer) from transformers' own GGUF loader: the reference (~30 s per module
    that uses it; not kept for the session: 0.6 GB)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf.parent, smollm2_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 torch_dtype=torch.float32).eval()
    return model, tokenizer
