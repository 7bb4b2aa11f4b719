"""Embeddings over /v1/embeddings, /api/embed and /api/embeddings against transformers' hidden
states, with the official `openai` and `ollama` clients, while generation runs."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import ollama
import openai
import pytest
import torch

from .conftest import LiveServer, start_server

TEXTS = ["The capital of France is Paris.", "hello", "Embeddings are pooled hidden states."]


@pytest.fixture(scope="module")
def exact_bundle(smollm2_gguf: Path):
    """The SmolLM2 file dequantized to float32 with a float32 KV pool: the math transformers
    does, to compare with."""
    from levante.bundle import load
    from levante.load_config import LoadConfig

    return load(str(smollm2_gguf), LoadConfig(quant="none", kv_cache_dtype="float32",
                                              max_model_len=2048))


@pytest.fixture(scope="module")
def exact_server(exact_bundle) -> Iterator[LiveServer]:
    yield from start_server("smollm2", exact_bundle, max_num_seqs=4, max_queue=16)


@pytest.fixture(scope="module")
def hidden_states(hf_smollm2, exact_bundle):
    """text -> transformers' final-norm hidden states [S, dim] of it, from the HF tokenizer's
    ids, which must equal ours."""
    model, tokenizer = hf_smollm2
    ours = exact_bundle.tokenizer

    @torch.inference_mode()
    def run(text: str) -> torch.Tensor:
        ids = tokenizer(text).input_ids
        assert ids == ours.encode(text, add_bos=ours.should_add_bos)
        return model.model(torch.tensor([ids])).last_hidden_state[0]

    return run


@pytest.fixture(scope="module")
def reference(hidden_states):
    """text -> the mean of its hidden states over its tokens (unnormalized), as llama.cpp's
    `--embeddings` pools."""
    return lambda text: hidden_states(text).double().mean(dim=0).numpy()


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def test_last_token_pooling_under_the_flag(exact_bundle, hidden_states) -> None:
    """`levante serve --embedding-pooling last`: Ollama 0.12's vectors, the last token's."""
    for live in start_server("smollm2", exact_bundle, max_num_seqs=2, max_queue=4,
                             embedding_pooling="last"):
        r = ollama.Client(host=live.base_url).embed(model="smollm2", input=TEXTS)
        for text, vector in zip(TEXTS, r.embeddings):
            np.testing.assert_allclose(vector, _unit(hidden_states(text)[-1].numpy()),
                                       atol=2e-6)


def test_langchain_ollama_embeddings_equal_api_embed(server) -> None:
    from langchain_ollama import OllamaEmbeddings

    vectors = OllamaEmbeddings(model="smollm2", base_url=server.base_url).embed_documents(TEXTS)
    direct = httpx.post(server.base_url + "/api/embed",
                        json={"model": "smollm2", "input": TEXTS}).json()["embeddings"]
    assert vectors == direct
    query = OllamaEmbeddings(model="smollm2", base_url=server.base_url).embed_query(TEXTS[1])
    assert query == direct[1]


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


def _v1(server, timeout: float = 60, **body) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/embeddings", json={"model": "smollm2", **body},
                      timeout=timeout)


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


@pytest.mark.parametrize(("pooling_type", "flag", "expected"), [
    (None, None, "mean"), (1, None, "mean"), (2, None, "cls"), (3, None, "last"),
    (0, None, "last"), (2, "mean", "mean"), (4, "last", "last"), (4, None, "refused")])
def test_the_ggufs_pooling_type_is_honoured_unless_the_flag_says(
        tmp_path: Path, pooling_type: int | None, flag: str | None, expected: str) -> None:
    import gguf

    from levante.errors import ConfigError
    from levante.server.config import ServerConfig
    from levante.server.embeddings import serving_pooling

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    if pooling_type is not None:
        writer.add_uint32("llama.pooling_type", pooling_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    bundle = SimpleNamespace(format="gguf", path=path)
    config = ServerConfig(ref="m", embedding_pooling=flag)
    if expected == "refused":
        with pytest.raises(ConfigError, match="pooling_type is 4"):
            serving_pooling(config, bundle)
    else:
        assert serving_pooling(config, bundle).value == expected


@pytest.fixture(scope="module")
def small_server(smollm2_bundle) -> Iterator[LiveServer]:
    """Chunks of 128 tokens and a queue of 3, to watch a long input share the engine."""
    yield from start_server("smollm2", smollm2_bundle, max_num_seqs=2, max_queue=3,
                            max_num_batched_tokens=128)


def test_a_long_input_does_not_stall_a_stream_and_counts_against_the_queue(
        small_server) -> None:
    """While 2 inputs of ~1000 tokens embed (16 chunks), a greedy stream goes on receiving
    tokens, and the queue (1 stream + 2 inputs = max_queue 3) turns further requests away
    with a 503 and Retry-After, in OpenAI's and Ollama's shapes."""
    base = small_server.base_url
    long_text = " ".join(f"item {i} of a long list." for i in range(108))
    num_tokens = len(small_server.state.bundle.tokenizer.encode(long_text))
    assert 900 < num_tokens <= 1100
    arrivals: list[float] = []
    pending: dict[str, float] = {}
    started = threading.Event()

    def stream() -> None:
        body = {"model": "smollm2", "prompt": "Count: 1, 2,", "max_tokens": 1500,
                "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
                    started.set()
                if "done" in pending:
                    break  # leaving aborts the generation

    def embed() -> None:
        pending["sent"] = time.monotonic()
        try:  # 2 x 16 chunks beside a stream: ~2 s idle, 5 s (httpx's default) too short in CI
            pending["status"] = _v1(small_server, 300, input=[long_text, long_text + " end"]
                                    ).status_code
        except httpx.HTTPError as e:
            pending["status"] = repr(e)
        pending["done"] = time.monotonic()

    streamer = threading.Thread(target=stream)
    streamer.start()
    assert started.wait(60)
    embedder = threading.Thread(target=embed)
    embedder.start()
    deadline = time.monotonic() + 30
    while small_server.state.engine.num_embedding_inputs < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    busy = _v1(small_server, input="one more")
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert busy.json()["error"]["code"] == "queue_full"
    ollama_busy = httpx.post(base + "/api/embed", json={"model": "smollm2", "input": "x"})
    assert ollama_busy.status_code == 503 and list(ollama_busy.json()) == ["error"]
    chat = httpx.post(base + "/v1/completions", json={"model": "smollm2", "prompt": "hi"})
    assert chat.status_code == 503
    embedder.join(300)
    streamer.join(60)
    assert pending["status"] == 200
    during = [t for t in arrivals if pending["sent"] < t < pending["done"]]
    assert len(during) >= 8, (len(during), pending["done"] - pending["sent"])
    too_many = _v1(small_server, input=["a", "b", "c", "d"])
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "input"
    small_server.wait_idle(30)
