"""Embeddings over /v1/embeddings, /api/embed and /api/embeddings against transformers' hidden
states, with the official `openai` and `ollama` clients, while generation runs."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import ollama
import openai
import pytest
import torch

from .conftest import LiveServer, start_server

TEXTS = ["The capital of France is Paris.", "hello", "Embeddings are pooled hidden states."]


@pytest.fixture(scope="module")
def exact_server(smollm2_gguf: Path) -> Iterator[LiveServer]:
    """The SmolLM2 file dequantized to float32: the math transformers does, to compare with."""
    from levante.bundle import load

    bundle = load(str(smollm2_gguf), quant="none", max_seq_len=2048)
    yield from start_server("smollm2", bundle, max_num_seqs=4, max_queue=16)


@pytest.fixture(scope="module")
def reference(hf_smollm2, exact_server: LiveServer):
    """text -> transformers' final-norm hidden state of its last token (unnormalized), from
    the HF tokenizer's ids, which must equal ours."""
    model, tokenizer = hf_smollm2
    ours = exact_server.state.bundle.tokenizer

    @torch.inference_mode()
    def embed(text: str) -> np.ndarray:
        ids = tokenizer(text).input_ids
        assert ids == ours.encode(text, add_bos=ours.should_add_bos)
        return model.model(torch.tensor([ids])).last_hidden_state[0, -1].numpy()

    return embed


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def test_openai_client_embeddings_equal_transformers(exact_server, reference) -> None:
    client = openai.OpenAI(base_url=exact_server.base_url + "/v1", api_key="unused")
    r = client.embeddings.create(model="smollm2", input=TEXTS)  # the client asks for base64
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == "smollm2"
    for text, item in zip(TEXTS, r.data):
        np.testing.assert_allclose(item.embedding, _unit(reference(text)), atol=2e-6)
    tokenizer = exact_server.state.bundle.tokenizer
    expected = sum(len(tokenizer.encode(t, add_bos=tokenizer.should_add_bos)) for t in TEXTS)
    assert r.usage.prompt_tokens == r.usage.total_tokens == expected


def test_ollama_embed_is_normalized_and_legacy_route_is_raw(exact_server, reference) -> None:
    client = ollama.Client(host=exact_server.base_url)
    r = client.embed(model="smollm2", input=TEXTS[:2])
    assert r.model == "smollm2" and len(r.embeddings) == 2
    for text, vector in zip(TEXTS, r.embeddings):
        np.testing.assert_allclose(vector, _unit(reference(text)), atol=2e-6)
    assert r.prompt_eval_count == 8 and r.total_duration > 0
    legacy = client.embeddings(model="smollm2", prompt=TEXTS[0]).embedding
    np.testing.assert_allclose(legacy, reference(TEXTS[0]), rtol=1e-5, atol=1e-4)
    assert abs(np.linalg.norm(legacy) - 1) > 1  # Ollama's older route does not normalize


def test_quantized_default_is_close_to_transformers(server, reference) -> None:
    """The served Q4_1 blocks with 8-bit activations (as llama.cpp) point the same way."""
    r = httpx.post(server.base_url + "/v1/embeddings",
                   json={"model": "smollm2", "input": TEXTS}).json()
    for text, item in zip(TEXTS, r["data"]):
        assert float(np.dot(item["embedding"], _unit(reference(text)))) > 0.999


def _v1(server, **body) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/embeddings", json={"model": "smollm2", **body})


def test_batch_equals_singles_and_ids_equal_text(server) -> None:
    batch = _v1(server, input=TEXTS).json()["data"]
    singles = [_v1(server, input=t).json()["data"][0]["embedding"] for t in TEXTS]
    assert [d["embedding"] for d in batch] == singles  # bit for bit
    tokenizer = server.state.bundle.tokenizer
    ids = [tokenizer.encode(t) for t in TEXTS]
    assert _v1(server, input=ids[0]).json()["data"][0]["embedding"] == singles[0]
    by_ids = _v1(server, input=ids).json()
    assert [d["embedding"] for d in by_ids["data"]] == singles
    assert by_ids["usage"]["prompt_tokens"] == sum(map(len, ids))
    ollama_batch = httpx.post(server.base_url + "/api/embed",
                              json={"model": "smollm2", "input": TEXTS}).json()
    np.testing.assert_allclose(ollama_batch["embeddings"], singles, atol=1e-7)


def test_base64_holds_the_same_floats(server) -> None:
    floats = _v1(server, input=TEXTS[0]).json()["data"][0]["embedding"]
    encoded = _v1(server, input=TEXTS[0], encoding_format="base64").json()["data"][0]
    decoded = np.frombuffer(base64.b64decode(encoded["embedding"]), dtype="<f4")
    assert decoded.tolist() == np.asarray(floats, dtype=np.float32).tolist()
    assert len(decoded) == server.state.bundle.config.dim


def test_dimensions_openai_refuses_ollama_shortens(server) -> None:
    dim = server.state.bundle.config.dim
    refused = _v1(server, input="hi", dimensions=8)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "dimensions"
    assert len(_v1(server, input="hi", dimensions=dim).json()["data"][0]["embedding"]) == dim
    full = httpx.post(server.base_url + "/api/embed", json={"model": "smollm2", "input": "hi"})
    short = httpx.post(server.base_url + "/api/embed",
                       json={"model": "smollm2", "input": "hi", "dimensions": 8})
    expected = _unit(np.asarray(full.json()["embeddings"][0][:8]))
    np.testing.assert_allclose(short.json()["embeddings"][0], expected, atol=1e-6)


def test_ollama_truncates_to_the_context_unless_told_not_to(server) -> None:
    text = " ".join(["word"] * 40)
    ids = server.state.bundle.tokenizer.encode(text)
    assert len(ids) > 16
    body = {"model": "smollm2", "input": text, "options": {"num_ctx": 16}}
    cut = httpx.post(server.base_url + "/api/embed", json=body).json()
    assert cut["prompt_eval_count"] == 16
    first_16 = _v1(server, input=ids[:16]).json()["data"][0]["embedding"]
    np.testing.assert_allclose(cut["embeddings"][0], first_16, atol=1e-7)
    refused = httpx.post(server.base_url + "/api/embed", json={**body, "truncate": False})
    assert refused.status_code == 400 and "context length" in refused.json()["error"]


def test_empty_inputs_as_ollama_answers_them(server) -> None:
    r = httpx.post(server.base_url + "/api/embed", json={"model": "smollm2", "input": []})
    assert r.json() == {"model": "smollm2", "embeddings": []}
    r = httpx.post(server.base_url + "/api/embeddings", json={"model": "smollm2", "prompt": ""})
    assert r.json() == {"embedding": []}


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [[]]}, 400, "input"),
    ({"input": [1, 10**9]}, 400, "input"),
    ({"input": list(range(2100))}, 400, "input"),
    ({"input": 5}, 400, "input"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "hi", "model": "gpt-4"}, 404, "model"),
])
def test_openai_bad_input_is_an_openai_error(server, body: dict, status: int, param) -> None:
    r = _v1(server, **body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"] or "").startswith(param)


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/api/embed", {"model": "smollm2", "input": 5}, 400),
    ("/api/embed", {"model": "smollm2", "input": [1, 2]}, 400),
    ("/api/embed", {"model": "nope", "input": "hi"}, 404),
    ("/api/embed", {"model": "smollm2", "input": "hi", "options": {"bogus": 1}}, 400),
    ("/api/embeddings", {"model": "smollm2", "prompt": 3}, 400),
    ("/api/embeddings", {"model": "nope", "prompt": "hi"}, 404),
])
def test_ollama_bad_input_is_an_ollama_error(server, path: str, body: dict,
                                             status: int) -> None:
    r = httpx.post(server.base_url + path, json=body)
    assert r.status_code == status
    assert list(r.json()) == ["error"] and isinstance(r.json()["error"], str)


def test_generation_running_meanwhile_is_unaffected(server) -> None:
    """Embeddings run on the engine thread between steps: a greedy generation streaming at the
    same time gives the tokens it gives alone, and the embeddings equal their solo values."""
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 96,
            "temperature": 0, "ignore_eos": True}
    alone = httpx.post(server.base_url + "/v1/completions", json=body).json()
    solo = [_v1(server, input=t).json()["data"][0]["embedding"] for t in TEXTS]
    started, texts = threading.Event(), []

    def stream() -> None:
        with httpx.stream("POST", server.base_url + "/v1/completions",
                          json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                started.set()
                if line.startswith("data: {"):
                    texts.append(json.loads(line[6:])["choices"][0]["text"])

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(30)
    during, overlapped = [], []
    for text in TEXTS * 3:
        overlapped.append(server.state.engine.num_active == 1)
        during.append(_v1(server, input=text).json()["data"][0]["embedding"])
    thread.join(60)
    assert "".join(texts) == alone["choices"][0]["text"]
    assert during == solo * 3
    assert sum(overlapped) >= 2  # the embeddings really ran while the generation did
    server.wait_idle()
