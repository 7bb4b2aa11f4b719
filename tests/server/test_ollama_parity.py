"""Ollama's /api/show capabilities and model_info, /api/create, /api/copy and /api/delete, with the
official `ollama` client and httpx against a live server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from .conftest import LiveServer, start_server

MESSAGES = [{"role": "user", "content": "Name a colour."}]
SYSTEM = "You answer in French, in one word."


@pytest.fixture()
def client(server) -> Iterator[ollama.Client]:
    yield ollama.Client(host=server.base_url)
    server.state.aliases.clear()


def _names(client: ollama.Client) -> list[str]:
    return [m.model for m in client.list().models]


def test_show_lists_capabilities_and_the_files_metadata(client, smollm2_gguf: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(smollm2_gguf)
    template = reader.fields["tokenizer.chat_template"].contents()
    assert "tools" not in template and "tool_call" not in template  # so no "tools"
    shown = client.show("smollm2")
    assert shown.capabilities == ["completion"]
    info = shown.modelinfo
    for key in ("llama.embedding_length", "llama.block_count", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.rope.dimension_count",
                "llama.vocab_size", "general.file_type", "tokenizer.ggml.bos_token_id"):
        assert info[key] == reader.fields[key].contents(), key
    assert info["llama.rope.freq_base"] == pytest.approx(
        reader.fields["llama.rope.freq_base"].contents())
    assert info["tokenizer.ggml.tokens"] is None  # arrays unread, as Ollama without verbose
    assert "general.name" not in info and "tokenizer.chat_template" not in info
    assert info["llama.context_length"] == 2048  # the served context, not the file's 8192


@pytest.fixture(scope="module")
def mistral_server(tiny_mistral_hf: Path) -> Iterator[LiveServer]:
    from levante.bundle import load

    bundle = load(str(tiny_mistral_hf), max_seq_len=512)
    yield from start_server("tiny-mistral", bundle, max_num_seqs=2, max_queue=4)


def test_mistral_v7_models_take_tools(mistral_server) -> None:
    shown = ollama.Client(host=mistral_server.base_url).show("tiny-mistral")
    assert shown.capabilities == ["completion", "tools", "insert"]  # Tekken has FIM
    assert shown.modelinfo["mistral.embedding_length"] == 320
    assert shown.template.startswith("# Mistral V7 instruct format")  # no template text


def _show(server, name: str) -> dict:
    """/api/show over httpx: the `ollama` client's ShowResponse has no `system` field."""
    r = httpx.post(server.base_url + "/api/show", json={"model": name})
    r.raise_for_status()
    return r.json()


def _chat(client: ollama.Client, model: str, **kwargs) -> ollama.ChatResponse:
    return client.chat(model=model, messages=MESSAGES, **kwargs)


def test_create_makes_a_name_with_its_system_prompt_and_parameters(server, client) -> None:
    r = client.create(model="helper", from_="smollm2", system=SYSTEM,
                      parameters={"temperature": 0, "num_predict": 6})
    assert r.status == "success"
    assert _names(client) == ["smollm2:latest", "helper:latest"]
    listed = {m.model: m for m in client.list().models}
    assert listed["helper:latest"].digest == listed["smollm2:latest"].digest
    made = _chat(client, "helper")
    spelled_out = client.chat(model="smollm2", messages=[
        {"role": "system", "content": SYSTEM}, *MESSAGES],
        options={"temperature": 0, "num_predict": 6})
    assert made.message.content == spelled_out.message.content and made.eval_count == 6
    plain = _chat(client, "smollm2", options={"temperature": 0, "num_predict": 6})
    assert plain.message.content != made.message.content  # the system prompt mattered
    assert _chat(client, "helper:latest", options={"num_predict": 2}).eval_count == 2
    shown = _show(server, "helper")
    assert shown["system"] == SYSTEM and "num_predict" in shown["parameters"]
    assert f'SYSTEM """{SYSTEM}"""' in shown["modelfile"]


def test_generate_with_a_made_name_uses_its_system_prompt(client) -> None:
    client.create(model="helper", from_="smollm2", system=SYSTEM, parameters={"temperature": 0})
    made = client.generate(model="helper", prompt="Name a colour.", options={"num_predict": 5})
    spelled_out = client.generate(model="smollm2", prompt="Name a colour.", system=SYSTEM,
                                  options={"temperature": 0, "num_predict": 5})
    assert made.response == spelled_out.response


def test_create_streams_progress_then_success(server, client) -> None:
    r = httpx.post(server.base_url + "/api/create", json={"model": "a", "from": "smollm2"})
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert r.status_code == 200 and lines[-1] == {"status": "success"}


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"model": "x", "from": "smollm2", "files": {"a.gguf": "sha256:00"}}, 400, "files"),
    ({"model": "x", "modelfile": "FROM smollm2\nTEMPLATE {{ .Prompt }}"}, 400,
     "line 2: TEMPLATE is not supported"),
    ({"model": "x", "modelfile": "# hi\nFORM smollm2"}, 400, "line 2: unknown instruction 'FORM'"),
    ({"model": "x", "modelfile": 'FROM smollm2\nSYSTEM """open'}, 400, "line 2"),
    ({"model": "x", "modelfile": "SYSTEM hi"}, 400, "FROM is required"),
    ({"model": "x", "modelfile": "FROM smollm2\nADAPTER ./a.gguf"}, 400, "line 2: ADAPTER"),
    ({"model": "x", "modelfile": "FROM smollm2\nPARAMETER bogus 1"}, 400, "parameters.bogus"),
    ({"model": "x", "modelfile": "FROM llama3.2"}, 404, "not found"),
    ({"model": "x", "from": "smollm2", "quantize": "q4_K_M"}, 400, "quantize"),
    ({"model": "x", "from": "smollm2", "template": "{{ .Prompt }}"}, 400, "template"),
    ({"model": "x", "from": "smollm2", "parameters": {"bogus": 1}}, 400, "parameters.bogus"),
    ({"model": "x", "from": "smollm2", "parameters": {"mirostat": 2}}, 400, "mirostat"),
    ({"model": "x"}, 400, "from"),
    ({"model": "x", "from": "llama3.2"}, 404, "not found"),
    ({"model": "smollm2:latest", "from": "smollm2"}, 400, "runs"),
    ({"model": "bad name!", "from": "smollm2"}, 400, "invalid"),
])
def test_create_refuses_what_it_cannot_make(server, client, body, status, needle) -> None:
    r = httpx.post(server.base_url + "/api/create", json=body)
    assert r.status_code == status and needle in r.json()["error"]
    assert _names(client) == ["smollm2:latest"]


def test_copy_then_delete(server, client) -> None:
    client.create(model="helper", from_="smollm2", system=SYSTEM)
    r = httpx.post(server.base_url + "/api/copy",
                   json={"source": "helper", "destination": "team/helper:v2"})
    assert r.status_code == 200 and r.content == b""
    assert "team/helper:v2" in _names(client)
    assert _show(server, "team/helper:v2")["system"] == SYSTEM  # a copy keeps what it copied
    client.copy("smollm2", "plain")
    assert "system" not in _show(server, "plain")
    assert client.delete("team/helper:v2").status == "success"
    assert "team/helper:v2" not in _names(client) and "helper:latest" in _names(client)
    gone = httpx.request("DELETE", server.base_url + "/api/delete",
                         json={"model": "team/helper:v2"})
    assert gone.status_code == 404 and "not found" in gone.json()["error"]
    with pytest.raises(ollama.ResponseError) as error:
        _chat(client, "team/helper:v2")
    assert error.value.status_code == 404


def test_copy_of_an_unknown_model_is_404(server) -> None:
    r = httpx.post(server.base_url + "/api/copy", json={"source": "nope", "destination": "x"})
    assert r.status_code == 404 and "not found" in r.json()["error"]


def test_the_served_model_cannot_be_deleted(server, client) -> None:
    for name in ("smollm2", "smollm2:latest"):
        r = httpx.request("DELETE", server.base_url + "/api/delete", json={"model": name})
        assert r.status_code == 400 and "runs" in r.json()["error"]
    assert _names(client) == ["smollm2:latest"]
    assert _chat(client, "smollm2", options={"num_predict": 1}).eval_count == 1
    wrong_method = httpx.post(server.base_url + "/api/delete", json={"model": "smollm2"})
    assert wrong_method.status_code == 405


MODELFILE = """# an older client's create
FROM smollm2
SYSTEM \"\"\"You answer in French,
in one word.\"\"\"
parameter temperature 0.2
PARAMETER num_predict 6
PARAMETER stop "<|im_end|>"
PARAMETER stop ###
LICENSE "Apache 2.0"
"""


def test_create_from_a_modelfile_as_older_clients_send(server, client,
                                                        smollm2_gguf: Path) -> None:
    r = httpx.post(server.base_url + "/api/create",
                   json={"model": "mf", "modelfile": MODELFILE, "stream": False})
    assert r.status_code == 200 and r.json() == {"status": "success"}
    shown = client.show("mf")
    assert shown.parameters.splitlines()[-3:] == [
        f"{'num_predict':<30} 6", f"{'stop':<30} \"<|im_end|>\"", f"{'stop':<30} \"###\""]
    assert f"{'temperature':<30} 0.2" in shown.parameters.splitlines()
    assert shown.template == _gguf_template(smollm2_gguf)
    system = _show(server, "mf")["system"]
    assert system == "You answer in French,\nin one word."
    made = _chat(client, "mf", options={"temperature": 0})
    spelled_out = client.chat(model="smollm2", messages=[
        {"role": "system", "content": system}, *MESSAGES],
        options={"temperature": 0, "num_predict": 6, "stop": ["<|im_end|>", "###"]})
    assert made.message.content == spelled_out.message.content
    # /api/show's Modelfile makes the same name again
    again = httpx.post(server.base_url + "/api/create",
                       json={"model": "mf2", "modelfile": shown.modelfile})
    assert again.status_code == 200, again.text
    assert _show(server, "mf2")["system"] == system
    assert client.show("mf2").parameters == shown.parameters


def _gguf_template(path: Path) -> str:
    from gguf import GGUFReader

    return GGUFReader(path).fields["tokenizer.chat_template"].contents()


def test_from_a_path_only_the_served_file_and_no_file_oracle(server, client, tmp_path: Path,
                                                             smollm2_gguf: Path) -> None:
    served = client.create(model="byfile", from_=str(smollm2_gguf), system=SYSTEM)
    assert served.status == "success" and "byfile:latest" in _names(client)
    other = tmp_path / "other.gguf"
    other.write_bytes(smollm2_gguf.read_bytes()[:4096])
    answers = []
    for path in (other, tmp_path / "missing.gguf", Path("/etc/passwd"), tmp_path / "nope"):
        r = httpx.post(server.base_url + "/api/create",
                       json={"model": "x", "from": str(path), "stream": False})
        answers.append((r.status_code, r.json()))
        mf = httpx.post(server.base_url + "/api/create",
                        json={"model": "x", "modelfile": f"FROM {path}"})
        answers.append((mf.status_code, mf.json()))
    assert answers[0][0] == 400 and "serves one model" in answers[0][1]["error"]
    assert all(answer == answers[0] for answer in answers), answers
    assert "x:latest" not in _names(client)
