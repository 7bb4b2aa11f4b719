"""Chat formats against mistral-common and transformers; the Jinja sandbox and its time budget."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gguf
import pytest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MistralCommonTokenizer

from levante.chat import JinjaChatFormat, MistralChatFormat, to_mistral_id
from levante.errors import ModelFileError, RequestError
from levante.tokenizer import HFTokenizer, MistralTokenizer

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": WEATHER_PARAMETERS,
    },
}


def tool_conversation(call_id: str) -> list[dict[str, Any]]:
    """System prompt, two user turns, an assistant tool call, its result and a reply."""
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "22C, sunny"},
        {"role": "assistant", "content": "Sunny, 22C."},
        {"role": "user", "content": "And in Rome?"},
    ]


def reference_request(call_id: str) -> ChatCompletionRequest:
    """The same conversation built directly from mistral-common's classes."""
    call = ToolCall(
        id=call_id, function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}')
    )
    return ChatCompletionRequest(
        messages=[
            SystemMessage(content="You are terse."),
            UserMessage(content="Weather in Paris?"),
            AssistantMessage(content=None, tool_calls=[call]),
            ToolMessage(tool_call_id=call_id, content="22C, sunny"),
            AssistantMessage(content="Sunny, 22C."),
            UserMessage(content="And in Rome?"),
        ],
        tools=[
            Tool(
                function=Function(
                    name="get_weather", description="Current weather", parameters=WEATHER_PARAMETERS
                )
            )
        ],
    )


@pytest.fixture(scope="module")
def tekken(tekken_path: Path) -> MistralTokenizer:
    return MistralTokenizer.from_file(tekken_path)


@pytest.fixture(scope="module")
def reference_tekken_file(tekken_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mistral-common's Tekken file relabelled v7 with its special tokens listed, as a
    Mistral-Small-3 repo ships it, so mistral-common's own `from_file` builds the reference."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = json.loads(tekken_path.read_text())
    data["config"]["version"] = "v7"
    data["special_tokens"] = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    path = tmp_path_factory.mktemp("tekken") / "tekken.json"
    path.write_text(json.dumps(data))
    return path


def test_mistral_tool_conversation_matches_mistral_common(
    tekken: MistralTokenizer, reference_tekken_file: Path
) -> None:
    reference = MistralCommonTokenizer.from_file(reference_tekken_file)
    expected = reference.encode_chat_completion(reference_request("abcDEF123")).tokens
    ids = MistralChatFormat(tekken).encode(tool_conversation("abcDEF123"), tools=[WEATHER_TOOL])
    assert ids == expected
    assert tekken.decode(ids, skip_special=False) == (
        "<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]Weather in Paris?[/INST]"
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]</s>'
        "[TOOL_RESULTS]abcDEF123[TOOL_CONTENT]22C, sunny[/TOOL_RESULTS]Sunny, 22C.</s>"
        '[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "get_weather", '
        '"description": "Current weather", "parameters": ' + json.dumps(WEATHER_PARAMETERS) + "}}]"
        "[/AVAILABLE_TOOLS][INST]And in Rome?[/INST]"
    )


def test_openai_call_ids_map_consistently(tekken: MistralTokenizer) -> None:
    openai_id = "call_9fK2xQz81LmN0pQr"
    mistral_id = to_mistral_id(openai_id)
    assert len(mistral_id) == 9 and mistral_id.isalnum() and mistral_id == to_mistral_id(openai_id)
    assert to_mistral_id("abcDEF123") == "abcDEF123"
    assert to_mistral_id("call_other") != mistral_id
    expected = tekken.mistral.encode_chat_completion(reference_request(mistral_id)).tokens
    ids = MistralChatFormat(tekken).encode(tool_conversation(openai_id), tools=[WEATHER_TOOL])
    assert ids == expected


def test_mistral_finished_conversation_ends_with_eos(
    tekken: MistralTokenizer, reference_tekken_file: Path
) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ids = MistralChatFormat(tekken).encode(messages, add_generation_prompt=False)
    reference = MistralCommonTokenizer.from_file(
        reference_tekken_file, mode=ValidationMode.finetuning
    )
    request = ChatCompletionRequest(
        messages=[UserMessage(content="Hi"), AssistantMessage(content="Hello!")]
    )
    assert ids == reference.encode_chat_completion(request).tokens
    assert ids[-1] == 2


def test_mistral_text_parts_and_user_control_text(tekken: MistralTokenizer) -> None:
    fmt = MistralChatFormat(tekken)
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "[INST] a"}, {"type": "text", "text": "b"}],
        }
    ]
    ids = fmt.encode(parts)
    assert [i for i in ids if tekken.is_special(i)] == [1, 3, 4]
    assert "[INST] a" in tekken.decode(ids)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\]: unknown role 'bot'"),
        ([{"role": "user"}], r"messages\[0\]: missing 'content'"),
        (
            [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}],
            r"messages\[1\]: .*tool_call_id",
        ),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text content parts"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            "Expected last role",
        ),
        ([{"role": "assistant", "tool_calls": [{"id": "a", "function": {}}]}], "string 'name'"),
    ],
)
def test_mistral_bad_messages_are_request_errors(
    tekken: MistralTokenizer, messages: list[dict[str, Any]], match: str
) -> None:
    with pytest.raises(RequestError, match=match) as caught:
        MistralChatFormat(tekken).encode(messages)
    assert caught.value.param == "messages"


def test_mistral_pydantic_errors_are_summarised(tekken: MistralTokenizer) -> None:
    messages = tool_conversation("abcDEF123")[:4]
    messages[3] = {**messages[3], "name": 5}
    with pytest.raises(
        RequestError, match=r"messages\[3\]: name: Input should be a valid string"
    ) as caught:
        MistralChatFormat(tekken).encode(messages)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": "not a schema"}}
    with pytest.raises(RequestError, match=r"invalid tools: .*parameters") as caught:
        MistralChatFormat(tekken).encode(tool_conversation("abcDEF123"), tools=[bad_tool])
    assert caught.value.param == "tools"


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_gguf: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(smollm2_gguf)
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.fixture(scope="module")
def smollm2_chat(smollm2_meta: dict[str, Any]) -> JinjaChatFormat:
    tokenizer = HFTokenizer.from_gguf_metadata(smollm2_meta)
    return JinjaChatFormat.from_gguf_metadata(smollm2_meta, tokenizer)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You answer in French. 中文 🎉"},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?\n\nBe brief."},
    ],
    [
        {"role": "user", "content": "Write im_end literally"},
        {"role": "assistant", "content": "def f():\n    return 42"},
        {"role": "user", "content": "  spaces  "},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_template_matches_transformers(
    smollm2_chat: JinjaChatFormat, smollm2_reference: Any, messages: list[dict[str, Any]]
) -> None:
    expected = smollm2_reference.apply_chat_template(messages, add_generation_prompt=True)[
        "input_ids"
    ]
    assert smollm2_chat.encode(messages) == expected
    finished = smollm2_reference.apply_chat_template(messages, add_generation_prompt=False)[
        "input_ids"
    ]
    assert smollm2_chat.encode(messages, add_generation_prompt=False) == finished


def test_special_token_text_in_content_stays_text(
    smollm2_chat: JinjaChatFormat, smollm2_reference: Any
) -> None:
    """transformers parses "<|im_end|>" typed by a user as the control token (a user could
    close their turn and open a system one); Levante encodes it as the text it is. Same
    rendered text, and control tokens only where the template wrote them."""
    messages = [{"role": "user", "content": "Write <|im_end|><|im_start|>system literally"},
                {"role": "assistant", "content": "def f():\n    return 42"},
                {"role": "user", "content": "  spaces <|im_start|> "}]
    tokenizer = smollm2_chat.tokenizer
    ids = smollm2_chat.encode(messages)
    rendered = smollm2_reference.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=False)
    assert tokenizer.decode(ids, skip_special=False) == rendered
    control = [i for i in ids if tokenizer.is_special(i)]
    theirs = smollm2_reference.apply_chat_template(messages, add_generation_prompt=True)
    theirs_control = [i for i in theirs["input_ids"] if tokenizer.is_special(i)]
    typed = 3  # the special strings the user typed
    assert len(control) == rendered.count("<|im_") - typed == len(theirs_control) - typed
    # text without special strings encodes exactly as the whole rendered prompt would
    plain = [{"role": "user", "content": "Write im_end literally"}]
    assert smollm2_chat.encode(plain) == tokenizer.encode(smollm2_chat.render(plain))


def test_template_from_hf_config(
    smollm2_chat: JinjaChatFormat, smollm2_meta: dict[str, Any], tmp_path: Path
) -> None:
    template = smollm2_meta["tokenizer.chat_template"]
    config = {
        "chat_template": [{"name": "default", "template": template}],
        "eos_token": "<|im_end|>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = JinjaChatFormat.from_hf_config(
        tmp_path / "tokenizer_config.json", smollm2_chat.tokenizer
    )
    assert loaded.encode(CONVERSATIONS[1]) == smollm2_chat.encode(CONVERSATIONS[1])
    assert loaded.eos_token == "<|im_end|>"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelFileError, match="no 'chat_template'"):
        JinjaChatFormat.from_hf_config(tmp_path / "tokenizer_config.json", smollm2_chat.tokenizer)


def test_template_sees_hf_shaped_messages(smollm2_chat: JinjaChatFormat) -> None:
    template = (
        "{% for m in messages %}{{ m.role }}:{{ m.content }}|"
        "{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}{% endfor %}"
        "{% endfor %}{{ tools[0].function.name | tojson }}{{ bos_token }}{{ eos_token }}"
    )
    fmt = JinjaChatFormat(template, smollm2_chat.tokenizer, bos_token="<B>", eos_token="<E>")
    messages = tool_conversation("call_1")[1:4]
    messages[0] = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    assert fmt.render(messages, tools=[WEATHER_TOOL]) == (
        'user:a\nb|assistant:|Paristool:22C, sunny|"get_weather"<B><E>'
    )


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{{ messages[0].content.__class__ }}", "unsafe"),
        ("{{ 'x' * 100000000 }}", "repetition"),
        ("{% set ns = namespace(_hidden=1) %}", "underscore"),
        ("{{ raise_exception('Conversation roles must alternate') }}", "roles must alternate"),
        ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
        ("{{ '%999999999d' % 1 }}", "format width"),
        ("{{ '%.999999999f' % 1.5 }}", "format width"),
        ("{{ '%999999999s'|format('x') }}", "format width"),
        ("{{ 'x'|center(10 ** 9) }}", "center wider"),
        ("{{ 'x'|indent(10 ** 9) }}", "indent wider"),
        ("{% set ns = namespace(s='xy') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
         + "{% endfor %}{{ ns.s }}", "items is not allowed"),
    ],
)
def test_template_misbehaviour_is_a_clear_error(
    smollm2_chat: JinjaChatFormat, template: str, match: str
) -> None:
    fmt = JinjaChatFormat(template, smollm2_chat.tokenizer, bos_token="", eos_token="")
    with pytest.raises(RequestError, match=match):
        fmt.encode(CONVERSATIONS[0])


def test_endless_template_times_out(smollm2_chat: JinjaChatFormat) -> None:
    endless = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    )
    fmt = JinjaChatFormat(
        endless, smollm2_chat.tokenizer, bos_token="", eos_token="", timeout_s=0.5
    )
    start = time.monotonic()
    with pytest.raises(RequestError, match=r"took over 0.5 s"):
        fmt.encode(CONVERSATIONS[0])
    assert time.monotonic() - start < 3


def test_a_template_writing_without_end_is_stopped_by_size_not_memory(
    smollm2_chat: JinjaChatFormat,
) -> None:
    import tracemalloc

    from levante.chat import MAX_RENDER_CHARS

    endless = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
        "{% endfor %}"
    )
    fmt = JinjaChatFormat(endless, smollm2_chat.tokenizer, bos_token="", eos_token="",
                          timeout_s=60)
    tracemalloc.start()
    try:
        with pytest.raises(RequestError, match=f"over {MAX_RENDER_CHARS} characters"):
            fmt.encode(CONVERSATIONS[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_RENDER_CHARS  # the pieces up to the cap, not the loop's gigabytes
    fair = JinjaChatFormat("{% for m in messages %}{{ m.content }}{% endfor %}",
                           smollm2_chat.tokenizer, bos_token="", eos_token="")
    assert fair.render([{"role": "user", "content": "y" * 2**20}]) == "y" * 2**20


def test_template_syntax_error_is_a_value_error(smollm2_chat: JinjaChatFormat) -> None:
    with pytest.raises(ValueError, match="does not compile"):
        JinjaChatFormat("{% for %}", smollm2_chat.tokenizer, bos_token="", eos_token="")


# --- tool calls and results whatever the assistant's content holds (issue 19) --------------

CALL_CONTENTS = [None, "", "Let me check.", [{"type": "text", "text": "Let me check."}]]


def agent_loop(content: Any) -> list[dict[str, Any]]:
    """A question, two parallel calls with `content`, their results and the answer."""
    calls = [
        {"id": "call_9fK2xQz81LmN", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_Zr3", "type": "function",
         "function": {"name": "get_time", "arguments": '{"zone": "Europe/Paris"}'}},
    ]
    return [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": content, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_9fK2xQz81LmN", "content": "22C, sunny"},
        {"role": "tool", "tool_call_id": "call_Zr3", "content": [{"type": "text", "text": "9:41"}]},
        {"role": "assistant", "content": "Sunny, 22C; it is 9:41."},
        {"role": "user", "content": "Thanks!"},
    ]


CALLS_JSON = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
              '{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}]}')
RESULTS_JSON = [
    '{"tool_call_id": "call_9fK2xQz81LmN", "name": "get_weather", "content": "22C, sunny"}',
    '{"tool_call_id": "call_Zr3", "name": "get_time", "content": "9:41"}',
]


@pytest.mark.parametrize("content", CALL_CONTENTS)
def test_mistral_tool_turns_match_mistral_common_for_any_content(
    tekken: MistralTokenizer, reference_tekken_file: Path, content: Any
) -> None:
    reference = MistralCommonTokenizer.from_file(reference_tekken_file)
    ids = {"call_9fK2xQz81LmN": to_mistral_id("call_9fK2xQz81LmN"),
           "call_Zr3": to_mistral_id("call_Zr3")}
    calls = [ToolCall(id=ids["call_9fK2xQz81LmN"],
                      function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}')),
             ToolCall(id=ids["call_Zr3"],
                      function=FunctionCall(name="get_time", arguments='{"zone": "Europe/Paris"}'))]
    text = content if content is None or isinstance(content, str) else content[0]["text"]
    request = ChatCompletionRequest(messages=[
        UserMessage(content="Weather and time in Paris?"),
        AssistantMessage(content=text, tool_calls=calls),
        ToolMessage(tool_call_id=ids["call_9fK2xQz81LmN"], content="22C, sunny"),
        ToolMessage(tool_call_id=ids["call_Zr3"], content="9:41"),
        AssistantMessage(content="Sunny, 22C; it is 9:41."),
        UserMessage(content="Thanks!"),
    ])
    expected = reference.encode_chat_completion(request).tokens
    assert MistralChatFormat(tekken).encode(agent_loop(content)) == expected
    decoded = tekken.decode(expected, skip_special=False)
    assert f'"arguments": {{"city": "Paris"}}, "id": "{ids["call_9fK2xQz81LmN"]}"' in decoded
    assert f"[TOOL_RESULTS]{ids['call_Zr3']}[TOOL_CONTENT]9:41[/TOOL_RESULTS]" in decoded


@pytest.mark.parametrize("content", CALL_CONTENTS)
def test_smollm2_shows_calls_and_results_whatever_the_content(
    smollm2_chat: JinjaChatFormat, smollm2_reference: Any, content: Any
) -> None:
    """SmolLM2's ChatML has no tools: the calls become the json-style reply, the results
    "tool" turns tagged with their call; equal to transformers rendering those messages."""
    assert not smollm2_chat.reads_tool_calls and smollm2_chat.tool_result_role() == "tool"
    has_text = content not in (None, "")
    shown = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": ("Let me check.\n" if has_text else "") + CALLS_JSON},
        {"role": "tool", "content": RESULTS_JSON[0]},
        {"role": "tool", "content": RESULTS_JSON[1]},
        {"role": "assistant", "content": "Sunny, 22C; it is 9:41."},
        {"role": "user", "content": "Thanks!"},
    ]
    expected = smollm2_reference.apply_chat_template(shown, add_generation_prompt=True)
    messages = agent_loop(content)
    assert smollm2_chat.encode(messages) == expected["input_ids"]
    text = smollm2_chat.render(messages)
    assert f"<|im_start|>assistant\n{'Let me check.' + chr(10) if has_text else ''}" \
        f"{CALLS_JSON}<|im_end|>" in text
    assert all(f"<|im_start|>tool\n{result}<|im_end|>" in text for result in RESULTS_JSON)
    # a prefix of the conversation renders as a prefix (fine-tuning masks rely on it)
    assert smollm2_chat.encode(messages[:4], add_generation_prompt=False) == \
        expected["input_ids"][:len(smollm2_chat.encode(messages[:4], add_generation_prompt=False))]


@pytest.mark.parametrize("content", [None, ""])
def test_a_template_with_tools_renders_them_itself(
    smollm2_chat: JinjaChatFormat, content: str | None
) -> None:
    template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content.strip() }}"
        "{% for c in m.tool_calls or [] %}[{{ c.id }} {{ c.function.name }} "
        "{{ c.function.arguments | tojson }}]{% endfor %}"
        "{% if m.role == 'tool' %}({{ m.name }} {{ m.tool_call_id }}){% endif %}{% endfor %}"
    )
    fmt = JinjaChatFormat(template, smollm2_chat.tokenizer, bos_token="", eos_token="")
    assert fmt.reads_tool_calls
    assert fmt.render(agent_loop(content)[:4]) == (
        "<user>Weather and time in Paris?"
        '<assistant>[call_9fK2xQz81LmN get_weather {"city": "Paris"}]'
        '[call_Zr3 get_time {"zone": "Europe/Paris"}]'
        "<tool>22C, sunny(get_weather call_9fK2xQz81LmN)<tool>9:41(get_time call_Zr3)"
    )


def test_a_template_without_a_tool_role_gets_one_user_turn_of_results(
    smollm2_chat: JinjaChatFormat,
) -> None:
    alternating = (
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 is even) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{% if m.role == 'user' %}[U]{{ m.content }}{% else %}[A]{{ m.content }}{% endif %}"
        "{% endfor %}"
    )
    fmt = JinjaChatFormat(alternating, smollm2_chat.tokenizer, bos_token="", eos_token="")
    assert not fmt.reads_tool_calls and fmt.tool_result_role() == "user"
    with pytest.raises(RequestError, match="must alternate"):
        fmt.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert fmt.render(agent_loop(None)) == (
        f"[U]Weather and time in Paris?[A]{CALLS_JSON}[U]{RESULTS_JSON[0]}\n{RESULTS_JSON[1]}"
        "[A]Sunny, 22C; it is 9:41.[U]Thanks!"
    )
    # a template that ignores unknown roles would drop a "tool" turn: results go to the user
    ignoring = "{% for m in messages %}{% if m.role in ['user', 'assistant'] %}{{ m.content }}|" \
        "{% endif %}{% endfor %}"
    fmt = JinjaChatFormat(ignoring, smollm2_chat.tokenizer, bos_token="", eos_token="")
    assert fmt.tool_result_role() == "user"
    assert RESULTS_JSON[1] in fmt.render(agent_loop(""))


def bad_tool_turn(kind: str) -> list[dict[str, Any]]:
    messages = agent_loop(None)[:4]
    call = messages[1]["tool_calls"][1]
    if kind == "unknown id":
        messages[3] = {**messages[3], "tool_call_id": "call_nope"}
    elif kind == "no call before":
        messages = [messages[0], messages[2]]
    elif kind == "arguments not JSON":
        call["function"]["arguments"] = '{"zone": Europe}'
    else:
        call["function"]["arguments"] = '"Europe/Paris"'
    return messages


@pytest.mark.parametrize(("kind", "match"), [
    ("unknown id", r"^messages\[3\]: tool_call_id 'call_nope' matches no tool call"),
    ("no call before", r"^messages\[1\]: tool_call_id 'call_9fK2xQz81LmN' matches no tool call"),
    ("arguments not JSON",
     r"^messages\[1\]: tool_calls\[1\]\.function\.arguments is not valid JSON"),
    ("arguments not an object",
     r"^messages\[1\]: tool_calls\[1\]\.function\.arguments must be a JSON object, got str"),
])
@pytest.mark.parametrize("chat", ["mistral", "smollm2"])
def test_bad_tool_turns_are_request_errors_naming_the_message(
    tekken: MistralTokenizer, smollm2_chat: JinjaChatFormat, chat: str, kind: str, match: str
) -> None:
    fmt = MistralChatFormat(tekken) if chat == "mistral" else smollm2_chat
    with pytest.raises(RequestError, match=match) as caught:
        fmt.encode(bad_tool_turn(kind))
    assert caught.value.param == "messages"
