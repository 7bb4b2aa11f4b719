"""`suffix` (fill-in-the-middle) on a live server: /v1/completions and Ollama's /api/generate
answer with the FIM prompt for a Tekken model, and a 400 naming `suffix` for SmolLM2 (no FIM)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from openai import BadRequestError, OpenAI

from levante.chat.fim import fim_prompt_ids

from .conftest import LiveServer, start_server

PREFIX, SUFFIX = "def add(a, b):\n    return", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def mistral_server(tiny_mistral_hf: Path) -> Iterator[LiveServer]:
    from levante.bundle import load

    bundle = load(str(tiny_mistral_hf), max_seq_len=512)
    yield from start_server("tiny-mistral", bundle, max_num_seqs=2, max_queue=4)


def _fim_ids(server: LiveServer) -> list[int]:
    return fim_prompt_ids(server.state.bundle.tokenizer, PREFIX, SUFFIX, model="tiny-mistral")


def test_completion_with_suffix_reads_the_fim_prompt(mistral_server: LiveServer) -> None:
    client = OpenAI(base_url=mistral_server.base_url + "/v1", api_key="x")
    r = client.completions.create(model="tiny-mistral", prompt=[PREFIX, ""], suffix=SUFFIX,
                                  max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1] and all(c.text for c in r.choices)
    empty_prefix = fim_prompt_ids(mistral_server.state.bundle.tokenizer, "", SUFFIX, model="m")
    assert r.usage.prompt_tokens == len(_fim_ids(mistral_server)) + len(empty_prefix)
    plain = client.completions.create(model="tiny-mistral", prompt=PREFIX, max_tokens=1)
    assert plain.usage.prompt_tokens == len(mistral_server.state.bundle.tokenizer.encode(
        PREFIX, add_bos=True))  # no suffix: the plain prompt, as before


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"prompt": [1, 2, 3]}, "suffix", "needs a text prompt"),
    ({"prompt": PREFIX, "echo": True}, "echo", "echo is not supported with suffix"),
])
def test_suffix_combinations_refused(mistral_server: LiveServer, body: dict, param: str,
                                     needle: str) -> None:
    r = httpx.post(mistral_server.base_url + "/v1/completions",
                   json={"model": "tiny-mistral", "suffix": SUFFIX, **body})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and needle in error["message"]


def test_model_without_fim_answers_400_naming_suffix(server: LiveServer) -> None:
    client = OpenAI(base_url=server.base_url + "/v1", api_key="x")
    with pytest.raises(BadRequestError) as info:
        client.completions.create(model="smollm2", prompt=PREFIX, suffix=SUFFIX, max_tokens=2)
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "suffix"
    assert "'smollm2' does not support suffix (fill-in-the-middle)" in error["message"]
    shown = ollama.Client(host=server.base_url).show("smollm2")
    assert "insert" not in (shown.capabilities or [])


def test_ollama_generate_with_suffix(mistral_server: LiveServer) -> None:
    client = ollama.Client(host=mistral_server.base_url)
    r = client.generate(model="tiny-mistral", prompt=PREFIX, suffix=SUFFIX,
                        options={"temperature": 0, "num_predict": 3})
    assert r.done and r.eval_count and r.prompt_eval_count == len(_fim_ids(mistral_server))
    assert r.context[:r.prompt_eval_count] == _fim_ids(mistral_server)
    assert "insert" in (client.show("tiny-mistral").capabilities or [])
    with pytest.raises(ollama.ResponseError, match="system is not supported with suffix"):
        client.generate(model="tiny-mistral", prompt=PREFIX, suffix=SUFFIX, system="s")
