"""Hardening, round 2 (a hostile client): /api/pull refuses local paths without telling
which exist; schemas whose recursion never ends are 400s before generation; tool grammars
are compiled once and bounded. After each refusal the server still answers normally."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import LiveServer, start_server

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


@pytest.fixture()
def offline_pulls(monkeypatch) -> None:
    """A pull of the registry's smollm2 must find it on disk, never download it."""
    from levante.weights import store

    def download(*args, **kwargs):
        raise AssertionError("pull tried to download")

    monkeypatch.setattr(store, "_download_wheel", download)


def assert_still_serving(http: httpx.Client) -> None:
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


# --- /api/pull: no file-existence oracle ------------------------------------------------------

def local_refs(tmp_path: Path) -> dict[str, str]:
    """Paths a client might probe: existing and missing files and folders, absolute and not."""
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")
    return {"existing gguf": str(tmp_path / "model.gguf"),
            "missing gguf": str(tmp_path / "absent.gguf"),
            "existing model folder": str(tmp_path / "folder"),
            "missing folder": str(tmp_path / "absent"),
            "existing system file": "/etc/passwd",
            "missing system file": "/etc/no-such-file",
            "home": "~", "relative": "./src", "parent": "../"}


def pull_answer(http: httpx.Client, ref: str, *, stream: bool) -> tuple[int, str]:
    """(status, body with the ref itself blanked out) of one /api/pull."""
    response = http.post("/api/pull", json={"model": ref, "stream": stream})
    return response.status_code, response.text.replace(ref, "<REF>")


@pytest.mark.parametrize("stream", [False, True])
def test_pull_refuses_local_paths_the_same_whether_they_exist(http, tmp_path, offline_pulls,
                                                              stream: bool) -> None:
    answers = {name: pull_answer(http, ref, stream=stream)
               for name, ref in local_refs(tmp_path).items()}
    assert len(set(answers.values())) == 1, answers
    status, body = next(iter(answers.values()))
    assert status == 400
    assert "local paths are refused" in body and "--allow-local-paths" in body
    assert "not a model file" not in body and "no such file" not in body
    assert http.post("/api/pull", json={"model": "smollm2", "stream": False}).json() == {
        "status": "success"}
    assert_still_serving(http)


def test_pull_of_a_relative_name_that_exists_on_disk_never_reads_it(http, offline_pulls,
                                                                    monkeypatch) -> None:
    """A ref shaped like a hub repo (org/repo) goes to the hub even if such a folder exists
    where the server runs: never to the disk."""
    from levante.weights import hub, store
    from levante.weights.registry import HubRef

    seen = []
    monkeypatch.setattr(store, "pull_hub", lambda ref, **kwargs: seen.append(ref) or Path("x"))
    monkeypatch.setattr(hub, "_check_local", lambda path: pytest.fail(f"read {path}"))
    assert http.post("/api/pull", json={"model": "src/levante", "stream": False}).status_code \
        == 200
    assert seen == [HubRef("src/levante")]


@pytest.fixture(scope="module")
def local_server(smollm2_bundle) -> Iterator[LiveServer]:
    yield from start_server("smollm2", smollm2_bundle, max_num_seqs=2, allow_local_paths=True)


def test_allow_local_paths_lets_pull_name_a_file(local_server, smollm2_gguf, tmp_path) -> None:
    with httpx.Client(base_url=local_server.base_url, timeout=60) as http:
        ok = http.post("/api/pull", json={"model": str(smollm2_gguf), "stream": False})
        assert ok.status_code == 200 and ok.json() == {"status": "success"}
        missing = http.post("/api/pull", json={"model": str(tmp_path / "x.gguf"),
                                               "stream": False})
        assert missing.status_code == 400 and "no such file" in missing.json()["error"]


def test_serve_flag_allow_local_paths(monkeypatch) -> None:
    from typer.testing import CliRunner

    import levante.server.app
    from levante.cli import app
    from levante.distributed.replicas import serve_args

    seen = []
    monkeypatch.setattr(levante.server.app, "serve", seen.append)
    assert CliRunner().invoke(app, ["serve", "m"]).exit_code == 0
    assert CliRunner().invoke(app, ["serve", "m", "--allow-local-paths"]).exit_code == 0
    assert [config.allow_local_paths for config in seen] == [False, True]
    assert "--allow-local-paths" in serve_args(seen[1])  # replicas get it too
    assert "--allow-local-paths" not in serve_args(seen[0])


# --- recursive schemas: 400 up front if the recursion cannot end, else valid output ---------

TREE = {"$defs": {"node": {"type": "object", "additionalProperties": False,
                           "required": ["name", "children"],
                           "properties": {"name": {"type": "string", "maxLength": 12},
                                          "children": {"type": "array", "maxItems": 2,
                                                       "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"}
ENDLESS = {"itself": {"$ref": "#"},
           "a cycle": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                       "$ref": "#/$defs/a"},
           "a required self": {"type": "object", "properties": {"next": {"$ref": "#"}},
                               "required": ["next"]}}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def tool_with(parameters: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": "plant", "parameters": parameters}}]


@pytest.mark.parametrize("name", ENDLESS)
def test_endless_recursive_schema_is_400_before_generation(http, server, name: str) -> None:
    """Before: the matcher failed on its first step or ran into llguidance's item limit
    mid-generation (a 500, or an empty "stop" reply that is no JSON at all)."""
    schema = ENDLESS[name]
    server.wait_idle()
    num_computed = server.engine.num_computed_tokens
    for body, param in [({"response_format": schema_format(schema)}, "response_format"),
                        ({"tools": tool_with({"type": "object", **schema, "required": ["x"],
                                              "properties": {"x": schema}}),
                          "tool_choice": "required"}, "tools")]:
        for stream in (False, True):
            response = http.post("/v1/chat/completions",
                                 json={**CHAT, "max_tokens": 64, "stream": stream, **body})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == param and "recurses without end" in error["message"]
    assert server.engine.num_computed_tokens == num_computed  # nothing reached the model
    assert_still_serving(http)


def test_recursive_tree_schema_works_end_to_end(http) -> None:
    import jsonschema

    body = {**CHAT, "messages": [{"role": "user", "content": "Ann has two children, Bo and Cy, who "
                                                     "have none. Her family tree as JSON:"}],
            "max_tokens": 400, "temperature": 0, "response_format": schema_format(TREE)}
    choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), TREE)
    tools = tool_with({"type": "object", "required": ["root"], "$defs": TREE["$defs"],
                       "properties": {"root": {"$ref": "#/$defs/node"}}})
    call = http.post("/v1/chat/completions", json={**body, "response_format": None, "tools": tools,
                                                   "tool_choice": "required"}).json()
    arguments = json.loads(call["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    jsonschema.validate(arguments, tools[0]["function"]["parameters"])


# --- tool grammars: compiled once per tool set, refusals too --------------------------------

def many_tools(count: int) -> list[dict]:
    return [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "days": {"type": "integer", "minimum": 1}},
        "required": ["city"]}}} for i in range(count)]


@pytest.fixture()
def compiles(monkeypatch) -> list[str]:
    """The lark source of every grammar the server compiles from here on."""
    from levante.chat import grammars

    seen: list[str] = []

    class Counted(grammars.Grammar):
        def __init__(self, compiler, lark: str, *, param: str) -> None:
            seen.append(lark)
            super().__init__(compiler, lark, param=param)

    monkeypatch.setattr(grammars, "Grammar", Counted)
    return seen


def test_the_same_128_tools_compile_once(http, server, compiles) -> None:
    """128 tools fit the grammar limits (the json-style prompt describing them does not fit
    SmolLM2's 2048-token window here, so the answer is a context-length 400: after the
    grammar was compiled, as a prompt with tools is sized only once it is rendered)."""
    server.state.chats.compiler._cache.clear()
    body = {**CHAT, "tools": many_tools(128), "tool_choice": "required"}
    for _ in range(3):
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["code"] == \
            "context_length_exceeded"
    assert len(compiles) == 1 and compiles[0].count('{"const": "tool_') == 128
    small = {**CHAT, "tools": many_tools(2), "tool_choice": "required", "max_tokens": 40}
    for _ in range(2):
        assert http.post("/v1/chat/completions", json=small).status_code == 200
    assert len(compiles) == 2
    assert_still_serving(http)


def test_a_refused_tool_set_is_not_recompiled(http, server, monkeypatch) -> None:
    from levante.chat import grammars

    calls = []
    original = grammars.check_recursion_ends
    monkeypatch.setattr(grammars, "check_recursion_ends",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    endless = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    body = {**CHAT, "tools": tool_with(endless)}
    answers = [http.post("/v1/chat/completions", json=body) for _ in range(3)]
    assert {(a.status_code, a.text) for a in answers} == {(400, answers[0].text)}
    assert len(calls) == 1
    assert_still_serving(http)
