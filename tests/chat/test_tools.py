"""Tool definitions, tool_choice, the call schemas, and parsing calls (whole and streamed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mistral_common.experimental.tools import _decode_tool_calls, _split_content_and_tool_calls
from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall
from mistral_common.protocol.instruct.tool_calls import ToolCall as MistralToolCall
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from levante.chat.tool_calls import (
    ChatDelta,
    ToolCallStreamer,
    new_tool_call_id,
    parse_tool_calls,
)
from levante.chat.tools import (
    json_calls_text,
    json_result_text,
    resolve_tool_choice,
    tool_calls_schema,
    tools_system_prompt,
    validate_tools,
)
from levante.errors import RequestError
from levante.tokenizer import HFTokenizer, MistralTokenizer, Tokenizer
from levante.weights.gguf import GGUFFile

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}}}}


@pytest.fixture(scope="module")
def mistral(tekken_path: Path) -> MistralTokenizer:
    return MistralTokenizer.from_file(tekken_path)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf: Path) -> HFTokenizer:
    return HFTokenizer.from_gguf_metadata(GGUFFile(smollm2_gguf).metadata)


def function(**fields: Any) -> list[dict[str, Any]]:
    return [{"type": "function", "function": fields}]


@pytest.mark.parametrize(("tools", "message"), [
    ({"name": "f"}, "tools must be a list"),
    ([{"function": {"name": "f"}}], 'tools[0] must be an object with "type": "function"'),
    ([{"type": "function"}], "tools[0].function must be an object"),
    (function(description="no name"), "tools[0].function.name must be"),
    (function(name="get weather"), "'get weather'"),
    (function(name="x" * 65), "1-64"),
    ([WEATHER, WEATHER], "tools[1].function.name 'get_weather' is already used"),
    (function(name="f", description=3), "description must be a string"),
    (function(name="f", parameters={"type": "array"}), '"type": "object"'),
    (function(name="f", parameters=["a"]), '"type": "object"'),
    (function(name="f", parameters={"type": "object", "properties": {"a": {"type": "strng"}}}),
     "at 'properties/a/type'"),
    (function(name="f", parameters={"type": "object", "required": "a"}), "not a valid JSON schema"),
    ([WEATHER] * 129, "at most 128 tools"),
])
def test_malformed_tools_are_400s(tools: Any, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        validate_tools(tools)
    assert caught.value.param == "tools"
    assert message in str(caught.value)


def test_validate_tools_normalizes() -> None:
    checked = validate_tools([WEATHER, function(name="ping")[0]])
    assert checked[0] == {"type": "function", "function": {**WEATHER["function"]}}
    ping = checked[1]["function"]
    assert ping["description"] == ""
    jsonschema.validate({}, ping["parameters"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"x": 1}, ping["parameters"])


def test_resolve_tool_choice() -> None:
    tools = validate_tools([WEATHER, ADD])
    assert resolve_tool_choice(tools, None) == ("auto", tools)
    assert resolve_tool_choice([], None) == ("none", [])
    assert resolve_tool_choice([], "auto") == ("none", [])
    assert resolve_tool_choice(tools, "required") == ("required", tools)
    assert resolve_tool_choice(tools, "none")[0] == "none"
    named = {"type": "function", "function": {"name": "add"}}
    assert resolve_tool_choice(tools, named) == ("required", [tools[1]])
    for bad, message in [("any", "must be one of"), ({"type": "function"}, "named tool_choice"),
                         ({"function": {"name": "add"}}, "named tool_choice"),
                         ({"type": "function", "function": {"name": "mul"}}, "'mul'")]:
        with pytest.raises(RequestError, match=message) as caught:
            resolve_tool_choice(tools, bad)
        assert caught.value.param == "tool_choice"
    with pytest.raises(RequestError, match="needs tools"):
        resolve_tool_choice([], "required")


def test_call_schemas_validate_the_documented_formats() -> None:
    tools = validate_tools([WEATHER, ADD])
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}},
             {"name": "add", "arguments": {"a": 1, "b": 2}}]
    mistral = tool_calls_schema(tools, parallel=True, style="mistral")
    jsonschema.validate(calls, mistral)
    jsonschema.validate([{**calls[0], "id": "abcDEF123"}], mistral)
    json_style = tool_calls_schema(tools, parallel=True, style="json")
    jsonschema.validate({"tool_calls": calls}, json_style)
    single = tool_calls_schema(tools, parallel=False, style="json")
    for bad, schema in [([], mistral), ([{"name": "add", "arguments": {"a": 1}}], mistral),
                        ([{"name": "mul", "arguments": {}}], mistral),
                        ([{**calls[0], "id": "call_1"}], mistral),
                        (calls, json_style), ({"tool_calls": calls}, single)]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_tools_system_prompt_describes_tools_and_format() -> None:
    prompt = tools_system_prompt(validate_tools([WEATHER, ADD]))
    assert "get_weather" in prompt and "Current weather" in prompt and '"city"' in prompt
    assert '{"tool_calls": [{"name": ' in prompt


def test_new_ids_are_valid_mistral_ids() -> None:
    ids = {new_tool_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 9 and i.isalnum() and i.isascii() for i in ids)


def mistral_call_ids(mistral: MistralTokenizer, calls: list[tuple[str, str]],
                     content: str | None = None) -> list[int]:
    """The assistant turn mistral-common encodes for `calls` (name, arguments), EOS included."""
    tool_calls = [MistralToolCall(id=f"abcdefgh{i}", function=FunctionCall(name=n, arguments=a))
                  for i, (n, a) in enumerate(calls)]
    messages: list[Any] = [UserMessage(content="hi"),
                           AssistantMessage(content=content, tool_calls=tool_calls)]
    messages += [ToolMessage(tool_call_id=c.id, content="ok") for c in tool_calls]
    ids = mistral.mistral.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    start = ids.index(4) + 1  # after the user's [/INST]
    end = next(i for i in range(start, len(ids)) if ids[i] in mistral.eos_ids)
    return ids[start:end + 1]


def test_parse_mistral_calls_matches_mistral_common(mistral: MistralTokenizer) -> None:
    answer = mistral_call_ids(mistral, [("get_weather", '{"city": "Zürich"}'),
                                        ("add", '{"a": 2, "b": -3}')])
    content, calls = parse_tool_calls(answer, mistral, style="mistral")
    assert content is None
    tekken = mistral.mistral.instruct_tokenizer.tokenizer
    _, reference_ids = _split_content_and_tool_calls(answer[:-1], 9)
    reference = _decode_tool_calls(reference_ids, tekken)  # mistral-common's own V7 parser
    assert [(c.name, json.loads(c.arguments)) for c in calls] == \
        [(r.function.name, json.loads(r.function.arguments)) for r in reference]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    assert calls[0].id not in {r.id for r in reference}  # fresh ids, never the model's
    assert calls[0].to_openai() == {"id": calls[0].id, "type": "function", "function": {
        "name": "get_weather", "arguments": calls[0].arguments}}


def test_parse_mistral_text_then_call(mistral: MistralTokenizer) -> None:
    ids = mistral.encode("Let me check.") + [9] + \
        mistral.encode('[{"name": "add", "arguments": {"a": 1, "b": 2}}]') + [2]
    content, calls = parse_tool_calls(ids, mistral, style="mistral")
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [("add", '{"a": 1, "b": 2}')]
    assert parse_tool_calls(mistral.encode("[TOOL_CALLS] typed by a user") + [2], mistral,
                            style="mistral") == ("[TOOL_CALLS] typed by a user", [])


def test_cut_off_call_is_content_not_a_call(mistral: MistralTokenizer) -> None:
    ids = [9] + mistral.encode('[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "ad')
    content, calls = parse_tool_calls(ids, mistral, style="mistral")
    assert [c.name for c in calls] == ["add"]
    assert content == '{"name": "ad'


@pytest.mark.parametrize(("text", "expected_content", "expected_calls"), [
    ('{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}', None,
     [("add", '{"a": 1, "b": 2}')]),
    ('{ "tool_calls" :[ {"arguments": {"city": "Rome"}, "name": "get_weather"} ] }', None,
     [("get_weather", '{"city": "Rome"}')]),
    ("Paris is sunny.", "Paris is sunny.", []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"tool_calls": [{"name": "add", "arguments": {"a": 1', '{"name": "add", "arguments": {"a": 1',
     []),
])
def test_parse_json_style(smollm2_tokenizer: HFTokenizer, text: str,
                          expected_content: str | None,
                          expected_calls: list[tuple[str, str]]) -> None:
    ids = smollm2_tokenizer.encode(text + "<|im_end|>")
    content, calls = parse_tool_calls(ids, smollm2_tokenizer, style="json")
    assert content == expected_content
    assert [(c.name, c.arguments) for c in calls] == expected_calls


def test_history_calls_are_the_json_style_reply(smollm2_tokenizer: HFTokenizer) -> None:
    """What a template without tools is shown for past calls is exactly what the json style
    asks the model to write, and parses back into the same calls, in the call schema."""
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
             {"id": "call_2", "type": "function",
              "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]
    text = json_calls_text(calls)
    assert text == ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Zürich"}}, '
                    '{"name": "add", "arguments": {"a": 1, "b": 2}}]}')
    schema = tool_calls_schema(validate_tools([WEATHER, ADD]), parallel=True, style="json")
    jsonschema.validate(json.loads(text), schema)
    content, parsed = parse_tool_calls(smollm2_tokenizer.encode(text + "<|im_end|>"),
                                       smollm2_tokenizer, style="json")
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == \
        [("get_weather", {"city": "Zürich"}), ("add", {"a": 1, "b": 2})]
    assert json.loads(json_result_text("call_1", "get_weather", "22C, «sunny»")) == \
        {"tool_call_id": "call_1", "name": "get_weather", "content": "22C, «sunny»"}


def stream(tokenizer: Tokenizer, ids: list[int], style: str) -> list[ChatDelta]:
    streamer = ToolCallStreamer(tokenizer, style=style)
    return [streamer.add([token_id]) for token_id in ids] + [streamer.finish()]


def openai_reassembled(deltas: list[ChatDelta]) -> Any:
    """What the openai client's stream helper makes of our deltas, one chunk each."""
    state = ChatCompletionStreamState()
    chunks = [{"role": "assistant", "content": ""}]
    chunks += [{"content": d.content or None, "tool_calls": d.tool_calls or None} for d in deltas]
    for index, delta in enumerate(chunks):
        is_last = index == len(chunks) - 1
        state.handle_chunk(ChatCompletionChunk.model_validate({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta,
                         "finish_reason": "tool_calls" if is_last else None}]}))
    return state.get_final_completion().choices[0].message


@pytest.mark.parametrize("style", ["mistral", "json"])
def test_streamed_calls_reassemble_in_the_openai_client(style: str, mistral: MistralTokenizer,
                                                        smollm2_tokenizer: HFTokenizer) -> None:
    calls = [("get_weather", '{"city": "S\\u00e3o \\"Paulo\\" {x}"}'),
             ("add", '{"a": 10, "b": [{"c": "]}"}]}')]
    if style == "mistral":
        tokenizer: Tokenizer = mistral
        ids = mistral_call_ids(mistral, calls, content="Checking.")
    else:
        tokenizer = smollm2_tokenizer
        body = ", ".join(f'{{"name": "{n}", "arguments": {a}}}' for n, a in calls)
        ids = smollm2_tokenizer.encode(f'{{"tool_calls": [{body}]}}<|im_end|>')
    deltas = stream(tokenizer, ids, style)
    entries = [e for d in deltas for e in d.tool_calls]
    assert entries[0]["id"] and entries[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert sum(1 for e in entries if e["index"] == 0) > 3  # arguments came in pieces
    message = openai_reassembled(deltas)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] \
        == [(n, json.loads(a)) for n, a in calls]
    assert [c.id for c in message.tool_calls] == [e["id"] for e in entries if "id" in e]
    content, parsed = parse_tool_calls(ids, tokenizer, style=style)
    assert [c.arguments for c in parsed] == [c.function.arguments for c in message.tool_calls]
    assert (message.content or None) == content == ("Checking." if style == "mistral" else None)


def _reply_ids(style: str, tokenizer: Tokenizer, mistral: MistralTokenizer) -> list[int]:
    """Content, then two calls, in the style's own format."""
    calls = [("get_weather", '{"city": "Rome"}'), ("add", '{"a": 1, "b": 2}')]
    if style == "mistral":
        return mistral_call_ids(mistral, calls, content="It is sunny in Paris. Let me check.")
    body = ", ".join(f'{{"name": "{n}", "arguments": {a}}}' for n, a in calls)
    return tokenizer.encode(f'{{"tool_calls": [{body}]}}<|im_end|>')


@pytest.mark.parametrize("style", ["mistral", "json"])
@pytest.mark.parametrize("stop", [(), ("sunny",), ('"add"',)])
def test_streamed_and_whole_replies_agree_field_by_field(
        style: str, stop: tuple[str, ...], mistral: MistralTokenizer,
        smollm2_tokenizer: HFTokenizer) -> None:
    """The server renders one token sequence as one whole response or as chunks in random
    splits (what the openai client reassembles): same content, calls, ids and finish reason.
    Stop strings cut the content with tools too, as the engine stops generating there."""
    import random

    from levante.engine.engine import StepOutput
    from levante.engine.output import TextState
    from levante.engine.sampling_params import SamplingParams
    from levante.server.metrics import Metrics
    from levante.server.responses import Generation

    tokenizer: Tokenizer = mistral if style == "mistral" else smollm2_tokenizer
    ids = _reply_ids(style, tokenizer, mistral)
    text = TextState(tokenizer, [], stop)
    end = next((i + 1 for i, t in enumerate(ids) if text.add(t)), len(ids))
    ids = ids[:end]  # where the engine would have stopped generating
    params = SamplingParams(stop=stop)

    def generation() -> Generation:
        metrics = Metrics(running=lambda: 0, waiting=lambda: 0, kv_used=lambda: 0, kv_total=1)
        return Generation(None, metrics, tokenizer, [(0, [1], params)],  # type: ignore[arg-type]
                          n=1, chat=True, model="m", tool_style=style)

    whole = generation()
    whole._update(whole.choices[0], StepOutput("r", ids, "", True, "stop", 1, len(ids)))
    message = whole._whole()["choices"][0]
    for seed in range(3):
        streamed, rng, position, chunks = generation(), random.Random(seed), 0, []
        while position < len(ids):
            piece = ids[position:position + rng.randint(1, 4)]
            position += len(piece)
            done = position == len(ids)
            out = StepOutput("r", piece, "", done, "stop" if done else None, 1, position)
            delta = streamed._update(streamed.choices[0], out)
            chunks.append(streamed._chunk(streamed.choices[0], delta, [], first=not chunks))
        state = ChatCompletionStreamState()
        for chunk in chunks:
            state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
        final = state.get_final_completion().choices[0]
        assert final.finish_reason == message["finish_reason"]
        assert (final.message.content or None) == (message["message"]["content"] or None)
        got = [(c.type, c.function.name, c.function.arguments)
               for c in final.message.tool_calls or []]
        assert got == [(c["type"], c["function"]["name"], c["function"]["arguments"])
                       for c in message["message"].get("tool_calls", [])]
        # ids are fresh per reply: the stream's are the ones its own whole message holds
        assert [c.id for c in final.message.tool_calls or []] == \
            [c["id"] for c in streamed.choices[0].tool_calls]
    content = message["message"]["content"] or ""
    assert not any(s in content for s in stop)
    if stop == ("sunny",) and style == "mistral":  # stopped in the content, before any call
        assert content == "It is " and "tool_calls" not in message["message"]
