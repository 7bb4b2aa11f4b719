"""Responses API bodies as chat requests: input items, tools, tool_choice, text.format."""

from __future__ import annotations

import pytest

from levante.errors import RequestError
from levante.server.responses_protocol import (
    ResponsesRequest,
    chat_messages,
    chat_response_format,
    chat_tool_choice,
)

CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
        "arguments": '{"city": "Paris"}', "id": "fc_1", "status": "completed"}
RESULT = {"type": "function_call_output", "call_id": "call_1", "output": "22C"}


def test_a_string_input_is_one_user_message_after_the_instructions() -> None:
    assert chat_messages("Hi", "Be brief.") == [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hi"}]


def test_calls_join_the_assistant_message_before_them_and_results_become_tool_turns() -> None:
    said = {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
            "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]}
    second = {**CALL, "call_id": "call_2"}
    messages = chat_messages([{"role": "user", "content": "Weather?"}, said, CALL, second,
                              RESULT, {**RESULT, "call_id": "call_2",
                                       "output": [{"type": "input_text", "text": "9C"}]}], None)
    assert messages[1] == {"role": "assistant",
                           "content": [{"type": "text", "text": "Let me look."}],
                           "tool_calls": [
                               {"id": "call_1", "type": "function", "function": {
                                   "name": "get_weather", "arguments": '{"city": "Paris"}'}},
                               {"id": "call_2", "type": "function", "function": {
                                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert messages[2:] == [{"role": "tool", "tool_call_id": "call_1", "content": "22C"},
                            {"role": "tool", "tool_call_id": "call_2", "content": "9C"}]


def test_a_call_without_text_before_it_is_its_own_assistant_turn() -> None:
    messages = chat_messages([{"role": "user", "content": "Weather?"}, CALL, RESULT], None)
    assert messages[1]["content"] is None and len(messages[1]["tool_calls"]) == 1


@pytest.mark.parametrize(("items", "words"), [
    ([RESULT], "matches no earlier function_call"),
    ([{**CALL, "arguments": {"city": "Paris"}}], "string 'arguments'"),
    ([{"role": "tool", "content": "x"}], "role must be one of"),
    ([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}], "input_file"),
    ([{"type": "reasoning", "summary": []}], "'reasoning' are not supported"),
    (["Hi"], "expected an object"),
])
def test_bad_items_name_their_index(items, words) -> None:
    with pytest.raises(RequestError, match=words) as info:
        chat_messages(items, None)
    assert info.value.param == "input" and f"input[{len(items) - 1}]" in str(info.value)


def test_history_comes_first_and_input_errors_count_from_the_new_input() -> None:
    """A previous response's items (its call) come before the new input, which may answer
    that call; an error in the new input names its index there, not in the whole."""
    history = [{"type": "message", "role": "user", "content": "Weather?", "id": "msg_0"},
               CALL]
    messages = chat_messages([RESULT], "Be brief.", history)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[2]["tool_calls"][0]["id"] == "call_1"
    assert chat_messages("Hi", None, history)[-1] == {"role": "user", "content": "Hi"}
    with pytest.raises(RequestError, match=r"input\[1\]: function_call_output call_id 'call_9'"):
        chat_messages([RESULT, {**RESULT, "call_id": "call_9"}], None, history)


def test_tool_choice_and_text_format_map_to_chat_shapes() -> None:
    assert chat_tool_choice("required") == "required"
    assert chat_tool_choice({"type": "function", "name": "f"}) == {
        "type": "function", "function": {"name": "f"}}
    schema = {"type": "object"}
    assert chat_response_format({"type": "json_schema", "name": "x", "schema": schema,
                                 "strict": True}) == {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert chat_response_format({"type": "text"}) is None
    assert chat_response_format({"type": "json_object"}) == {"type": "json_object"}


def test_flat_tools_become_nested_and_builtin_tools_are_refused() -> None:
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}
    form = ResponsesRequest(model="m", input="Hi", tools=[tool]).to_chat()
    assert form.tools == [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(RequestError, match="'web_search' tools are not supported"):
        ResponsesRequest(model="m", input="Hi", tools=[{"type": "web_search"}]).to_chat()


def test_background_and_conversations_are_refused() -> None:
    ResponsesRequest(model="m", input="Hi", previous_response_id="resp_1").check_supported()
    with pytest.raises(RequestError, match="background") as info:
        ResponsesRequest(model="m", input="Hi", background=True).check_supported()
    assert info.value.param == "background"
    with pytest.raises(RequestError, match="conversations are not stored"):
        ResponsesRequest(model="m", input="Hi", conversation="conv_1").check_supported()
