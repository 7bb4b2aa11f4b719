"""Grammar-constrained decoding: llguidance matchers, batched masks, and random models whose
every finished output validates (JSON schemas, tool calls)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import pytest
import torch
from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

from levante.bundle import Bundle, load
from levante.chat.grammars import GrammarCompiler
from levante.chat.tool_calls import parse_tool_calls
from levante.config import EngineConfig
from levante.engine.engine import Engine
from levante.engine.sampling_params import SamplingParams
from levante.errors import RequestError
from levante.structured import (
    Grammar,
    Matcher,
    MatcherError,
    fill_masks,
    llguidance_tokenizer,
)
from levante.tokenizer import MistralTokenizer, Tokenizer

SCHEMAS: list[dict[str, Any]] = [  # every string bounded: random models never close one
    {"type": "object", "additionalProperties": False, "required": ["user"], "properties": {
        "user": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                 "properties": {"name": {"type": "string", "maxLength": 12},
                                "age": {"type": "integer", "minimum": 0, "maximum": 120}}}}},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
     "minItems": 1, "maxItems": 4},
    {"type": "object", "additionalProperties": False, "required": ["color", "size"],
     "properties": {"color": {"enum": ["red", "green", "blue"]},
                    "size": {"type": "string", "enum": ["S", "M", "L"]}}},
    {"type": "object", "additionalProperties": False, "required": ["temperature", "ratio"],
     "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60},
                    "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}},
    {"type": "object", "additionalProperties": False, "required": ["id"],
     "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "note": {"type": "string", "maxLength": 8}, "flag": {"type": "boolean"}}},
    {"type": "object", "additionalProperties": False, "required": ["code", "zip"],
     "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
    {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "additionalProperties": False, "required": ["k", "v"],
        "properties": {"k": {"type": "string", "maxLength": 5}, "v": {"type": "boolean"}}}},
    {"type": "object", "additionalProperties": False, "required": ["value", "tags"],
     "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10},
                                        {"type": "null"}]},
                    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                             "maxItems": 3}}},
    {"$defs": {"point": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                         "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                        "y": {"type": "integer", "minimum": 0, "maximum": 9}}}},
     "type": "object", "additionalProperties": False, "required": ["a", "b"],
     "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}}},
    {"type": "object", "additionalProperties": False, "required": ["version", "name"],
     "properties": {"version": {"const": "v1"},
                    "name": {"type": "string", "minLength": 2, "maxLength": 6}}},
]

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                    "properties": {"city": {"type": "string", "maxLength": 10},
                                   "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
     "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                    "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                   "b": {"type": "integer", "minimum": -99, "maximum": 99}}}}},
    {"type": "function", "function": {"name": "search", "description": "Search the web",
     "parameters": {"type": "object", "additionalProperties": False, "required": ["query"],
                    "properties": {"query": {"type": "string", "maxLength": 12},
                                   "limit": {"type": "integer", "minimum": 1, "maximum": 10}}}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                   "strict": True}}


def generate(bundle: Bundle, requests: list[tuple[list[int], Grammar | None]], *,
             max_tokens: int, num_kv_blocks: int | None = None
             ) -> tuple[list[tuple[list[int], str, str]], int]:
    """(token ids, text, finish_reason) per (prompt, grammar), sampled and seeded; and the
    number of preemptions. All requests run as one batch through the engine."""
    config = EngineConfig(max_model_len=256, max_num_seqs=len(requests),
                          num_kv_blocks=num_kv_blocks)
    engine = Engine(bundle.model, bundle.tokenizer, config)
    ids = [engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, seed=seed),
                              grammar=grammar) for seed, (prompt, grammar) in enumerate(requests)]
    tracked = [engine.requests[request_id] for request_id in ids]
    outputs = engine.run_to_completion(ids)
    results = []
    for request_id in ids:
        steps = outputs[request_id]
        results.append(([t for s in steps for t in s.new_token_ids],
                         "".join(s.new_text for s in steps), str(steps[-1].finish_reason)))
    return results, sum(request.num_preemptions for request in tracked)


@pytest.fixture(scope="module")
def tiny_mistral(tiny_mistral_hf: Path) -> Bundle:
    return load(str(tiny_mistral_hf))


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Bundle:
    return load(str(smollm2_gguf))


@pytest.fixture(scope="module")
def mistral_compiler(tekken_path: Path) -> GrammarCompiler:
    return GrammarCompiler(MistralTokenizer.from_file(tekken_path))


@pytest.fixture(scope="module")
def tiny_compiler(tiny_mistral: Bundle) -> GrammarCompiler:
    return GrammarCompiler(tiny_mistral.tokenizer)


@pytest.fixture(scope="module")
def smollm2_compiler(smollm2: Bundle) -> GrammarCompiler:
    return GrammarCompiler(smollm2.tokenizer)


def consume_text(matcher: Matcher, tokenizer: Tokenizer, text: str) -> None:
    for token_id in tokenizer.encode(text):
        matcher.consume(token_id)


# --- tokenizers and matchers -------------------------------------------------------------

@pytest.mark.parametrize("which", ["mistral_compiler", "smollm2_compiler"])
def test_llguidance_tokenizer_agrees_with_ours(which: str, request: pytest.FixtureRequest) -> None:
    compiler: GrammarCompiler = request.getfixturevalue(which)
    tokenizer = compiler.tokenizer
    ll = compiler.ll_tokenizer
    assert ll.vocab_size == tokenizer.vocab_size
    assert set(ll.eos_tokens) == set(tokenizer.eos_ids)
    ids = tokenizer.encode('{"city": "Zürich", "n": 42} 中文 <tab>\t')
    assert ll.decode_str(ids) == tokenizer.decode(ids)
    special = [i for i in range(50) if tokenizer.is_special(i)]
    assert special and all(ll.is_special_token(i) for i in special)


def test_llguidance_tokenizer_rejects_unknown_type() -> None:
    with pytest.raises(TypeError, match="no llguidance tokenizer"):
        llguidance_tokenizer(object())  # type: ignore[arg-type]


def test_schema_matcher_accepts_valid_and_rejects_invalid(mistral_compiler: GrammarCompiler
                                                          ) -> None:
    tokenizer = mistral_compiler.tokenizer
    grammar = mistral_compiler.compile(response_format=json_schema_format(SCHEMAS[0]),
                                       chat_style="mistral")
    assert grammar is not None
    matcher = grammar.matcher()
    consume_text(matcher, tokenizer, '{"user": {"name": "Ada", "age": 36}}')
    assert matcher.is_finished and matcher.is_accepting
    matcher = grammar.matcher()  # a fresh one: state is per sequence
    consume_text(matcher, tokenizer, '{"user": {"name": "Ada", "age": ')
    assert not matcher.is_finished
    with pytest.raises(MatcherError, match="rejected token"):
        consume_text(matcher, tokenizer, "121}}")  # age > maximum


def test_finished_grammar_allows_only_eos(mistral_compiler: GrammarCompiler) -> None:
    tokenizer = mistral_compiler.tokenizer
    grammar = mistral_compiler.compile(response_format={"type": "json_object"},
                                       chat_style="mistral")
    assert grammar is not None
    matcher = grammar.matcher()
    first = fill_masks([matcher], tokenizer.vocab_size)[0]
    assert not first[sorted(tokenizer.eos_ids)].any()  # no empty answer
    consume_text(matcher, tokenizer, '{"a": [1, 2]}')
    allowed = fill_masks([matcher], tokenizer.vocab_size)[0]
    assert allowed.nonzero().flatten().tolist() == sorted(tokenizer.eos_ids)


def test_fill_masks_batch_equals_single_masks(smollm2_compiler: GrammarCompiler) -> None:
    tokenizer = smollm2_compiler.tokenizer
    grammars = [smollm2_compiler.compile(response_format=json_schema_format(s),
                                         chat_style="json") for s in SCHEMAS[:3]]
    matchers: list[Matcher | None] = [g.matcher() for g in grammars if g is not None]
    consume_text(matchers[0], tokenizer, '{"user": {"name": "B')  # type: ignore[arg-type]
    consume_text(matchers[1], tokenizer, "[3, ")  # type: ignore[arg-type]
    rows = [matchers[0], None, matchers[1], matchers[2]]
    padded = tokenizer.vocab_size + 64  # a model whose logits are wider than the vocabulary
    allowed = fill_masks(rows, padded)
    assert allowed.shape == (4, padded) and allowed.dtype == torch.bool
    assert allowed[1].all()
    for row in (0, 2, 3):
        matcher = rows[row]
        assert matcher is not None
        # llguidance's single-sequence API as the reference: one bit per token
        bits = torch.frombuffer(bytearray(matcher.ll_matcher.compute_bitmask()), dtype=torch.uint8)
        expected = ((bits[:, None] >> torch.arange(8)) & 1).flatten()[:tokenizer.vocab_size]
        assert torch.equal(allowed[row, :tokenizer.vocab_size], expected.bool())
        assert not allowed[row, tokenizer.vocab_size:].any()
        assert 0 < int(allowed[row].sum()) < tokenizer.vocab_size
    assert fill_masks([None, None], 10).all()


# --- what each request compiles to ----------------------------------------------------------

def test_nothing_to_constrain_gives_none(mistral_compiler: GrammarCompiler) -> None:
    assert mistral_compiler.compile(chat_style="mistral") is None
    assert mistral_compiler.compile(response_format={"type": "text"}, chat_style="mistral") is None
    assert mistral_compiler.compile(tools=TOOLS, tool_choice="none", chat_style="json") is None


def test_compiled_grammars_are_cached(mistral_compiler: GrammarCompiler) -> None:
    first = mistral_compiler.compile(tools=TOOLS, tool_choice="required", chat_style="mistral")
    again = mistral_compiler.compile(tools=TOOLS, tool_choice="required", chat_style="mistral")
    assert first is again and first is not None


def test_mistral_tool_choice_none_forbids_tool_calls_token(mistral_compiler: GrammarCompiler
                                                           ) -> None:
    grammar = mistral_compiler.compile(tools=TOOLS, tool_choice="none", chat_style="mistral")
    assert grammar is not None
    matcher = grammar.matcher()
    consume_text(matcher, mistral_compiler.tokenizer, "Sure, here it is")
    assert not fill_masks([matcher], 131072)[0, 9]
    with pytest.raises(MatcherError):
        matcher.consume(9)


def test_mistral_auto_allows_text_or_a_constrained_call(mistral_compiler: GrammarCompiler
                                                        ) -> None:
    tokenizer = mistral_compiler.tokenizer
    grammar = mistral_compiler.compile(tools=TOOLS, tool_choice="auto", chat_style="mistral")
    assert grammar is not None
    text = grammar.matcher()
    consume_text(text, tokenizer, "It is sunny.")
    assert text.is_accepting and not text.is_finished  # may go on, or end with EOS
    call = grammar.matcher()
    call.consume(9)
    consume_text(call, tokenizer, '[{"name": "add", "arguments": {"a": 1, "b": 2}}]')
    assert call.is_finished
    bad = grammar.matcher()
    bad.consume(9)
    with pytest.raises(MatcherError):
        consume_text(bad, tokenizer, '[{"name": "add", "arguments": {"a": "one"')


def test_mistral_grammar_accepts_mistral_commons_call_encoding(
        mistral_compiler: GrammarCompiler) -> None:
    """What V7 puts in history for a call (so what the model learned) is inside our grammar."""
    tokenizer = mistral_compiler.tokenizer
    assert isinstance(tokenizer, MistralTokenizer)
    calls = [ToolCall(id="a1b2c3d4e", function=FunctionCall(name="get_weather",
                                                           arguments='{"city": "Zürich"}')),
             ToolCall(id="Z9Y8X7W6V", function=FunctionCall(name="add",
                                                           arguments='{"a": 2, "b": -3}'))]
    request = ChatCompletionRequest(messages=[
        UserMessage(content="hi"), AssistantMessage(tool_calls=calls),
        ToolMessage(tool_call_id="a1b2c3d4e", content="12 C"),
        ToolMessage(tool_call_id="Z9Y8X7W6V", content="-1")])
    ids = tokenizer.mistral.encode_chat_completion(request).tokens
    start = ids.index(9)
    end = next(i for i in range(start, len(ids)) if ids[i] in tokenizer.eos_ids)
    answer = ids[start:end + 1]  # [TOOL_CALLS][...]</s>
    assert tokenizer.decode(answer).startswith('[{"name": "get_weather", "arguments": {"city"')
    grammar = mistral_compiler.compile(tools=TOOLS, tool_choice="required",
                                       chat_style="mistral")
    assert grammar is not None
    matcher = grammar.matcher()
    for token_id in answer:
        matcher.consume(token_id)
    assert matcher.is_finished


def test_json_style_auto_braces_mean_a_call(smollm2_compiler: GrammarCompiler) -> None:
    tokenizer = smollm2_compiler.tokenizer
    grammar = smollm2_compiler.compile(tools=TOOLS, tool_choice="auto", chat_style="json")
    assert grammar is not None
    text = grammar.matcher()
    consume_text(text, tokenizer, "No tool needed {really}.")
    assert text.is_accepting
    call = grammar.matcher()
    consume_text(call, tokenizer, '{"tool_calls": [{"name": "search", "arguments": '
                                  '{"query": "levante"}}]}')
    assert call.is_finished
    with pytest.raises(MatcherError):
        consume_text(grammar.matcher(), tokenizer, '{"answer": 1}')


def test_named_function_and_no_parallel_calls(mistral_compiler: GrammarCompiler) -> None:
    tokenizer = mistral_compiler.tokenizer
    grammar = mistral_compiler.compile(
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=False, chat_style="mistral")
    assert grammar is not None
    matcher = grammar.matcher()
    matcher.consume(9)
    consume_text(matcher, tokenizer, '[{"name": "add", "arguments": {"a": 1, "b": 2}}')
    with pytest.raises(MatcherError):
        consume_text(matcher, tokenizer, ", ")  # one call only
    other = grammar.matcher()
    other.consume(9)
    with pytest.raises(MatcherError):
        consume_text(other, tokenizer, '[{"name": "search"')


@pytest.mark.parametrize(("kwargs", "param", "message"), [
    ({"response_format": {"type": "yaml"}}, "response_format", "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "schema must be a JSON schema object"),
    ({"response_format": json_schema_format({"type": "objec"})}, "response_format",
     "not a valid JSON schema"),
    ({"response_format": json_schema_format({"type": "string", "pattern": "(["})},
     "response_format", "regex"),
    ({"response_format": json_schema_format({"not": {"type": "string"}})}, "response_format",
     '"not"'),
    ({"response_format": json_schema_format({"type": "integer", "minimum": 5, "maximum": 1})},
     "response_format", "Unsatisfiable"),
    ({"response_format": json_schema_format({"type": "array", "uniqueItems": True})},
     "response_format", "uniqueItems"),
    ({"response_format": json_schema_format({"type": "object",
                                             "description": "x" * 300_000})},
     "response_format", "at most"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"if": {"type": "string"}}}}}}],
      "tool_choice": "required"}, "tools", "tools[0].function.parameters is not supported"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope'"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
])
def test_bad_requests_are_400s_naming_the_problem(mistral_compiler: GrammarCompiler,
                                                 kwargs: dict[str, Any], param: str,
                                                 message: str) -> None:
    with pytest.raises(RequestError, match=None) as caught:
        mistral_compiler.compile(chat_style="mistral", **kwargs)
    assert caught.value.param == param
    assert message in str(caught.value)


def test_parser_limits_fail_the_matcher_not_the_process(mistral_compiler: GrammarCompiler
                                                        ) -> None:
    grammar = mistral_compiler.compile(response_format=json_schema_format(SCHEMAS[5]),
                                       chat_style="mistral")
    assert grammar is not None
    starved = llguidance.LLMatcher(mistral_compiler.ll_tokenizer,
                                   llguidance.LLMatcher.grammar_from_lark(grammar.lark),
                                   limits=llguidance.LLParserLimits(step_lexer_fuel=10),
                                   log_level=0)
    matcher = Matcher(grammar, starved)
    consume_text(matcher, mistral_compiler.tokenizer, '{"code": "')
    fill_masks([matcher], 131072)
    with pytest.raises(MatcherError):
        consume_text(matcher, mistral_compiler.tokenizer, "ABC")


# --- random models: every finished output is valid -----------------------------------------

Results = list[tuple[list[int], str, str]]


def schemas_and_tool_calls(bundle: Bundle, compiler: GrammarCompiler, style: str,
                           tool_prompt: list[int]) -> tuple[Results, Results]:
    """60 sampled requests as one batch: 30 across the 10 schemas, 30 with tool_choice
    "required" over the 3 tools (one call each: a random model keeps adding parallel calls;
    parallel calls are checked above)."""
    schema_prompt = bundle.tokenizer.encode("Answer in JSON:")
    requests = [(schema_prompt, compiler.compile(
        response_format=json_schema_format(SCHEMAS[i % 10]), chat_style=style))
        for i in range(30)]
    calls = compiler.compile(tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                             chat_style=style)
    results, _ = generate(bundle, requests + [(tool_prompt, calls)] * 30, max_tokens=160)
    return results[:30], results[30:]


@pytest.fixture(scope="module")
def tiny_mistral_outputs(tiny_mistral: Bundle, tiny_compiler: GrammarCompiler
                         ) -> tuple[Results, Results]:
    prompt = tiny_mistral.tokenizer.encode("What is the weather in Paris?", add_bos=True)
    return schemas_and_tool_calls(tiny_mistral, tiny_compiler, "mistral", prompt)


@pytest.fixture(scope="module")
def smollm2_outputs(smollm2: Bundle, smollm2_compiler: GrammarCompiler
                    ) -> tuple[Results, Results]:
    prompt = smollm2.tokenizer.encode("<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                                      "<|im_start|>assistant\n")
    return schemas_and_tool_calls(smollm2, smollm2_compiler, "json", prompt)


def check_schema_outputs(results: Results) -> None:
    for i, (_, text, finish_reason) in enumerate(results):
        assert finish_reason == "stop", (i, text)
        jsonschema.validate(json.loads(text), SCHEMAS[i % 10])


def check_tool_calls(results: Results, tokenizer: Tokenizer, style: str) -> None:
    names = set()
    for i, (ids, text, finish_reason) in enumerate(results):
        assert finish_reason == "stop", (i, text)
        content, calls = parse_tool_calls(ids, tokenizer, style=style)
        assert content is None and len(calls) == 1, (i, text)
        jsonschema.validate(json.loads(calls[0].arguments), PARAMETERS[calls[0].name])
        names.add(calls[0].name)
    assert len(names) > 1  # the sampled calls reach more than one tool


def test_random_tiny_mistral_outputs_validate_against_10_schemas(
        tiny_mistral_outputs: tuple[Results, Results]) -> None:
    check_schema_outputs(tiny_mistral_outputs[0])


def test_random_tiny_mistral_required_tool_calls_validate(
        tiny_mistral: Bundle, tiny_mistral_outputs: tuple[Results, Results]) -> None:
    check_tool_calls(tiny_mistral_outputs[1], tiny_mistral.tokenizer, "mistral")


def test_smollm2_outputs_validate_against_10_schemas(
        smollm2_outputs: tuple[Results, Results]) -> None:
    check_schema_outputs(smollm2_outputs[0])


def test_smollm2_required_tool_calls_validate(
        smollm2: Bundle, smollm2_outputs: tuple[Results, Results]) -> None:
    check_tool_calls(smollm2_outputs[1], smollm2.tokenizer, "json")


def test_cut_off_output_is_length_not_valid(tiny_mistral: Bundle,
                                            tiny_compiler: GrammarCompiler) -> None:
    grammar = tiny_compiler.compile(response_format=json_schema_format(SCHEMAS[0]),
                                    chat_style="mistral")
    results, _ = generate(tiny_mistral, [(tiny_mistral.tokenizer.encode("JSON:"), grammar)],
                          max_tokens=4)
    _, text, finish_reason = results[0]
    assert finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_matchers_survive_preemption(tiny_mistral: Bundle, tiny_compiler: GrammarCompiler
                                     ) -> None:
    """Recompute after preemption replays tokens the matcher already consumed: matchers
    live with the request, not with its KV blocks."""
    grammars = [tiny_compiler.compile(response_format=json_schema_format(SCHEMAS[i]),
                                      chat_style="mistral") for i in (0, 6, 8)] * 2
    prompt = tiny_mistral.tokenizer.encode("JSON please, and make it a long one:", add_bos=True)
    results, num_preempted = generate(tiny_mistral, [(prompt, g) for g in grammars],
                                      max_tokens=100, num_kv_blocks=8)
    assert num_preempted > 0
    for i, (_, text, finish_reason) in enumerate(results):
        assert finish_reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMAS[(0, 6, 8)[i % 3]])
