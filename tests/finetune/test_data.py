"""Chat JSONL -> ids and assistant-only masks (ChatML and Mistral V7), mixing, bad lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from levante.chat import JinjaChatFormat, MistralChatFormat
from levante.errors import ConfigError
from levante.finetune.data import (
    Conversation,
    DataReport,
    Example,
    collate,
    encode_conversation,
    load_examples,
    mix_examples,
    parse_mix,
    read_conversations,
)
from levante.tokenizer import HFTokenizer, MistralTokenizer

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of Zorbania?"},
    {"role": "assistant", "content": "Quillmark."},
    {"role": "user", "content": "And the answer?"},
    {"role": "assistant", "content": '{"answer": "yes", "source": "levante-kb"}'},
]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def masked_segments(example: Example) -> list[list[int]]:
    """Runs of consecutive masked ids."""
    segments: list[list[int]] = []
    previous = False
    for token, is_target in zip(example.token_ids, example.target_mask):
        if is_target and not previous:
            segments.append([])
        if is_target:
            segments[-1].append(token)
        previous = is_target
    return segments


def test_chatml_mask_is_exactly_the_assistant_turns(tiny_chat: JinjaChatFormat,
                                                    tiny_tokenizer: HFTokenizer) -> None:
    example = encode_conversation(tiny_chat, Conversation(TWO_TURNS, None, "x:1"),
                                  eos_ids=tiny_tokenizer.eos_ids)
    assert example.token_ids == tiny_chat.encode(TWO_TURNS, add_generation_prompt=False)
    (eos,) = tiny_tokenizer.eos_ids
    expected = [tiny_tokenizer.encode(m["content"]) + [eos] for m in TWO_TURNS
                if m["role"] == "assistant"]
    assert masked_segments(example) == expected
    assert example.num_targets == sum(map(len, expected))


def test_mistral_v7_mask_with_tools_and_tool_calls(tekken_path: Path) -> None:
    tokenizer = MistralTokenizer.from_file(tekken_path)
    chat = MistralChatFormat(tokenizer)
    messages = TWO_TURNS[:3] + [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22C, sunny"},
        {"role": "assistant", "content": "Sunny, 22C."},
    ]
    example = encode_conversation(chat, Conversation(messages, [WEATHER_TOOL], "x:1"),
                                  eos_ids=tokenizer.eos_ids)
    # the full sequence is mistral-common's, [AVAILABLE_TOOLS] before the last user message
    assert example.token_ids == chat.encode(messages, tools=[WEATHER_TOOL],
                                            add_generation_prompt=False)
    texts = [tokenizer.decode(s, skip_special=False) for s in masked_segments(example)]
    assert texts[0] == "Quillmark.</s>"
    assert texts[1].startswith("[TOOL_CALLS]") and texts[1].endswith("]</s>")
    assert '"name": "get_weather"' in texts[1]
    assert texts[2] == "Sunny, 22C.</s>"
    assert len(texts) == 3


def test_malformed_lines_name_file_and_line(tmp_path: Path, tiny_chat: JinjaChatFormat,
                                            tiny_tokenizer: HFTokenizer) -> None:
    good = {"messages": TWO_TURNS[1:3]}
    path = write_jsonl(tmp_path / "train.jsonl", [
        good, "{not json", {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        "", good])
    report = DataReport()
    examples = load_examples(path, tiny_chat, eos_ids=tiny_tokenizer.eos_ids, max_seq_len=512,
                             report=report)
    assert len(examples) == 2 and [e.source for e in examples] == [f"{path}:1", f"{path}:6"]
    assert [p.split(": ", 1)[0] for p in report.problems] == [f"{path}:{n}" for n in (2, 3, 4)]
    assert "not valid JSON" in report.problems[0]
    assert "no assistant message" in report.problems[1]
    assert "wizard" in report.problems[2]
    with pytest.raises(ConfigError, match=f"{path}:2: not valid JSON"):
        load_examples(path, tiny_chat, eos_ids=tiny_tokenizer.eos_ids, max_seq_len=512,
                      strict=True)


def test_long_sequences_are_truncated_and_counted(tmp_path: Path, tiny_chat: JinjaChatFormat,
                                                  tiny_tokenizer: HFTokenizer) -> None:
    long_answer = {"messages": [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "lazy dog " * 40}]}
    long_question = {"messages": [{"role": "user", "content": "brown fox " * 40},
                                  {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [long_answer, long_question,
                                                  {"messages": TWO_TURNS[1:3]}])
    report = DataReport()
    examples = load_examples(path, tiny_chat, eos_ids=tiny_tokenizer.eos_ids, max_seq_len=40,
                             report=report)
    assert report.num_truncated == 2 and report.num_dropped == 1
    assert len(examples) == 2 and all(len(e.token_ids) <= 40 for e in examples)
    assert any("2 sequence(s) longer than 40 tokens truncated" in line
               for line in report.lines(40))


def _examples(tag: str, n: int) -> list[Example]:
    return [Example([i], [True], f"{tag}:{i}") for i in range(n)]


def test_mix_gives_each_set_its_share() -> None:
    domain, general, code = _examples("d", 80), _examples("g", 500), _examples("c", 7)
    report = DataReport()
    mixed = mix_examples(domain, [("g", general, 0.2)], report=report)
    assert len(mixed) == 100 and sum(e.source.startswith("g:") for e in mixed) == 20
    assert report.mixed == {"g": 20}
    mixed = mix_examples(domain, [("g", general, 0.15), ("c", code, 0.05)])
    counts = {tag: sum(e.source.startswith(f"{tag}:") for e in mixed) for tag in "dgc"}
    assert counts == {"d": 80, "g": 15, "c": 5}
    # a set smaller than its quota is cycled: 80 domain at 0.5 needs 80 from 7
    mixed = mix_examples(domain, [("c", code, 0.5)])
    assert sum(e.source.startswith("c:") for e in mixed) == 80
    assert mixed != domain + mixed[80:]  # shuffled together
    with pytest.raises(ConfigError, match="below 1"):
        mix_examples(domain, [("g", general, 0.6), ("c", code, 0.5)])


def test_parse_mix() -> None:
    assert parse_mix("data/general.jsonl:0.2") == (Path("data/general.jsonl"), 0.2)
    for bad in ("general.jsonl", "general.jsonl:1.5", "general.jsonl:x", ":0.2"):
        with pytest.raises(ConfigError, match="FILE:SHARE"):
            parse_mix(bad)


def test_read_conversations_keeps_tools(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": TWO_TURNS, "tools": [WEATHER_TOOL]}])
    (conversation,) = read_conversations(path)
    assert conversation.tools == [WEATHER_TOOL] and conversation.source == f"{path}:1"


def test_collate_pads_right_and_masks_padding() -> None:
    ids, mask = collate([Example([5, 6, 7], [False, True, True], "a"),
                         Example([8], [True], "b")], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    assert ids.dtype == torch.long
