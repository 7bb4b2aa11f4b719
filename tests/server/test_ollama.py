"""The official `ollama` client against a live server: chat, generate, list, show, ps, pull."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
GREEDY = {"temperature": 0, "num_predict": 16}


@pytest.fixture()
def client(server) -> ollama.Client:
    return ollama.Client(host=server.base_url)


def _openai_chat(server, **body) -> dict:
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": "smollm2", **body})
    r.raise_for_status()
    return r.json()


def test_chat_matches_the_openai_route_and_counts(client, server) -> None:
    r = client.chat(model="smollm2", messages=MESSAGES, options=GREEDY)
    reference = _openai_chat(server, messages=MESSAGES, max_tokens=16, temperature=0)
    assert r.message.role == "assistant" and "Paris" in r.message.content
    assert r.message.content == reference["choices"][0]["message"]["content"]
    assert r.done and r.done_reason == reference["choices"][0]["finish_reason"]
    assert r.prompt_eval_count == len(server.state.bundle.chat_format.encode(MESSAGES))
    assert r.eval_count == reference["usage"]["completion_tokens"]
    durations = (r.load_duration, r.prompt_eval_duration, r.eval_duration)
    assert all(isinstance(d, int) and d >= 0 for d in durations)
    assert r.prompt_eval_duration > 1_000 and r.eval_duration > 1_000  # nanoseconds
    assert r.total_duration >= r.prompt_eval_duration + r.eval_duration
    assert r.created_at.endswith("Z")


def test_chat_stream_equals_whole(client) -> None:
    whole = client.chat(model="smollm2", messages=MESSAGES, options=GREEDY)
    parts = list(client.chat(model="smollm2", messages=MESSAGES, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == whole.eval_count and parts[-1].message.content == ""
    assert parts[-1].done_reason == whole.done_reason


def test_generate_raw_matches_completions_and_returns_context(client, server) -> None:
    prompt = "The capital of France is"
    r = client.generate(model="smollm2", prompt=prompt, raw=True,
                        options={"temperature": 0, "num_predict": 8})
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    reference = httpx.post(server.base_url + "/v1/completions", json=body).json()
    assert r.response == reference["choices"][0]["text"] and r.response.strip()
    tokenizer = server.state.bundle.tokenizer
    prompt_ids = tokenizer.encode(prompt, add_bos=tokenizer.should_add_bos)
    assert r.prompt_eval_count == len(prompt_ids) and r.eval_count == 8
    assert r.done_reason == "length"
    assert list(r.context[:len(prompt_ids)]) == prompt_ids and len(r.context) == len(prompt_ids) + 8
    streamed = client.generate(model="smollm2", prompt=prompt, raw=True, stream=True,
                               options={"temperature": 0, "num_predict": 8})
    assert "".join(p.response for p in streamed) == r.response


def test_generate_applies_the_chat_template_with_system(client, server) -> None:
    r = client.generate(model="smollm2", prompt="Hi", system="Answer in French.",
                        options={"num_predict": 2})
    expected = server.state.bundle.chat_format.encode(
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}])
    assert r.prompt_eval_count == len(expected) and list(r.context[:len(expected)]) == expected


@pytest.mark.parametrize("name", ["smollm2:latest", "smollm2:135m"])
def test_ollama_names_resolve_to_the_served_model(client, name: str) -> None:
    r = client.chat(model=name, messages=MESSAGES, options={"num_predict": 2})
    assert r.model == name and r.eval_count == 2


def test_unknown_model_is_404(client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="llama3.2", messages=MESSAGES)
    assert caught.value.status_code == 404 and 'model "llama3.2" not found' in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("llama3.2")
    assert caught.value.status_code == 404


def test_options_seed_stop_and_limits(client) -> None:
    sampled = {"temperature": 1.0, "seed": 7, "num_predict": 12}
    a = client.chat(model="smollm2", messages=MESSAGES, options=sampled)
    b = client.chat(model="smollm2", messages=MESSAGES, options=sampled)
    assert a.message.content == b.message.content
    base = client.chat(model="smollm2", messages=MESSAGES, options=GREEDY).message.content
    stop = base.split()[2]
    cut = client.chat(model="smollm2", messages=MESSAGES, options={**GREEDY, "stop": [stop]})
    assert cut.done_reason == "stop" and stop not in cut.message.content
    assert base.startswith(cut.message.content)
    # num_ctx above the server's 2048 is clamped; num_ctx just above the prompt caps the output.
    big = client.chat(model="smollm2", messages=MESSAGES, options={**GREEDY, "num_ctx": 32768})
    assert big.message.content == base
    small = client.chat(model="smollm2", messages=MESSAGES,
                        options={"temperature": 0, "num_ctx": big.prompt_eval_count + 3})
    assert small.eval_count == 3 and small.done_reason == "length"


@pytest.mark.parametrize(("options", "needle"), [
    ({"num_ctx": 8}, "options.num_ctx"),
    ({"temprature": 0.5}, "options.temprature"),
    ({"mirostat": 2}, "options.mirostat"),
    ({"repeat_last_n": 64}, "options.repeat_last_n"),
    ({"top_p": 0}, "options.top_p"),
    ({"repeat_penalty": 0}, "options.repeat_penalty"),
    ({"num_predict": 0}, "options.num_predict"),
])
def test_bad_options_are_400_naming_the_option(client, options: dict, needle: str) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="smollm2", messages=MESSAGES, options=options)
    assert caught.value.status_code == 400 and needle in caught.value.error


@pytest.mark.parametrize(("body", "needle"), [
    ({"messages": MESSAGES, "format": "yaml"}, "format must be"),
    ({"messages": MESSAGES, "think": True}, "does not support thinking"),
    ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f f"}}]},
     "tools"),
    ({"messages": "hello"}, "messages"),
])
def test_bad_requests_get_ollama_shaped_errors(server, body: dict, needle: str) -> None:
    r = httpx.post(server.base_url + "/api/chat", json={"model": "smollm2", **body})
    assert r.status_code == 400 and list(r.json()) == ["error"] and needle in r.json()["error"]


def test_not_json_and_missing_model(server) -> None:
    r = httpx.post(server.base_url + "/api/generate", content=b"{nope")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(server.base_url + "/api/generate", json={"prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"].startswith("model")


@pytest.mark.parametrize(("body", "needle"), [
    ({"prompt": "x", "template": "{{ .Prompt }}"}, "template is not supported"),
    ({"prompt": "x", "suffix": "y"}, "'smollm2' does not support suffix"),
    ({"prompt": "x", "suffix": "y", "raw": True}, "raw is not supported with suffix"),
    ({"prompt": "x", "raw": True, "system": "s"}, "system has no effect with raw"),
    ({"prompt": "x", "images": ["aGk="]}, "images are not supported"),
])
def test_generate_refuses_what_it_cannot_honour(server, body: dict, needle: str) -> None:
    r = httpx.post(server.base_url + "/api/generate", json={"model": "smollm2", **body})
    assert r.status_code == 400 and needle in r.json()["error"]


def test_empty_request_answers_loaded(client) -> None:
    r = client.chat(model="smollm2", messages=[])
    assert r.done and r.done_reason == "load"
    assert client.generate(model="smollm2", prompt="").done_reason == "load"


def test_logprobs(client) -> None:
    r = client.chat(model="smollm2", messages=MESSAGES, options={"temperature": 0,
                    "num_predict": 4}, logprobs=True, top_logprobs=2)
    assert len(r.logprobs) == r.eval_count == 4
    for entry in r.logprobs:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 2 and entry.logprob == entry.top_logprobs[0].logprob


def test_list_show_ps_describe_the_served_file(client, server, smollm2_gguf) -> None:
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(smollm2_gguf)
    file_type = LlamaFileType(int(reader.fields["general.file_type"].contents()))
    template = reader.fields["tokenizer.chat_template"].contents()
    listed = client.list().models
    assert [m.model for m in listed] == ["smollm2:latest"]
    assert listed[0].size == smollm2_gguf.stat().st_size
    details = listed[0].details
    assert details.format == "gguf" and details.family == "llama"
    assert details.quantization_level == file_type.name.removeprefix("MOSTLY_") == "Q4_1"
    assert details.parameter_size == "134.52M"
    shown = client.show("smollm2")
    config = server.state.bundle.config
    assert shown.modelinfo["general.parameter_count"] == config.num_params
    assert shown.modelinfo["llama.context_length"] == 2048
    assert shown.template == template and "completion" in shown.capabilities
    running = client.ps().models
    assert [m.model for m in running] == ["smollm2:latest"] and running[0].context_length == 2048
    assert running[0].size > listed[0].size and running[0].size_vram == 0
    assert running[0].expires_at.year == 9999 and running[0].digest == listed[0].digest


def test_version_and_root(server) -> None:
    version = httpx.get(server.base_url + "/api/version").json()["version"]
    assert all(part.isdigit() for part in version.split("."))
    assert httpx.head(server.base_url + "/").status_code == 200


def test_pull_of_a_pulled_model_stays_offline(client, monkeypatch) -> None:
    from levante.weights import store

    def offline(*args, **kwargs):
        raise AssertionError("pull tried to download")

    monkeypatch.setattr(store, "_download_wheel", offline)
    assert client.pull("smollm2").status == "success"
    statuses = [p.status for p in client.pull("smollm2:135m", stream=True)]
    assert statuses[0] == "pulling smollm2:135m" and statuses[-1] == "success"


def test_pull_of_a_bad_ref_is_an_error(client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        list(client.pull("not a model", stream=True))
    assert "is not a model ref" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.pull("not a model")
    assert caught.value.status_code == 400


def test_leaving_a_stream_early_frees_the_engine(server) -> None:
    body = {"model": "smollm2", "prompt": "Tell me a long story.",
            "options": {"num_predict": 500}}
    with httpx.stream("POST", server.base_url + "/api/generate", json=body) as r:
        lines = r.iter_lines()
        first = json.loads(next(lines))
        assert first["done"] is False
    server.wait_idle(timeout=10)
    assert server.engine.pool.num_free == server.engine.pool.num_blocks


def test_format_schema_returns_valid_json(client) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string"}},
              "required": ["capital"]}
    r = client.chat(model="smollm2", messages=MESSAGES, format=schema,
                    options={"temperature": 0, "num_predict": 64})
    assert isinstance(json.loads(r.message.content)["capital"], str)


def test_tools_come_back_as_tool_calls(client) -> None:
    def get_weather(city: str) -> str:
        """Get the weather in a city.

        Args:
          city: The city's name
        """
        return "sunny"

    ask = "Call the get_weather function for the city of Paris."
    r = client.chat(model="smollm2", messages=[{"role": "user", "content": ask}],
                    tools=[get_weather], options={"temperature": 0, "num_predict": 64})
    call = r.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
