"""Scenario prompts: corpus text fitted to exact token lengths, chat template and tools counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from levante.bench.scenarios import (
    SCENARIOS,
    PromptBuilder,
    Scenario,
    corpus_path,
    load_prompt_tokenizer,
    parse_scenarios,
)
from levante.errors import ConfigError


@pytest.fixture(scope="module")
def corpus() -> str:
    return corpus_path().read_text(encoding="utf-8")


def test_the_posts_scenarios() -> None:
    sizes = {name: (s.input_len, s.output_len) for name, s in SCENARIOS.items()}
    assert sizes == {"faq": (500, 150), "summary": (4000, 500), "codegen": (1000, 800),
                     "function": (2000, 200), "multiturn": (8000, 300)}
    assert SCENARIOS["function"].tools and SCENARIOS["multiturn"].num_turns > 1
    assert SCENARIOS["faq"].expected_s == pytest.approx(0.476 + 150 / 150)


def test_parse_scenarios() -> None:
    assert [s.name for s in parse_scenarios("all")] == list(SCENARIOS)
    assert [s.name for s in parse_scenarios("faq,summary,faq")] == ["faq", "summary"]
    custom = parse_scenarios(None, input_len=64, output_len=32)
    assert [(s.name, s.input_len, s.output_len) for s in custom] == [("custom", 64, 32)]
    with pytest.raises(ConfigError, match="unknown scenario 'chat'"):
        parse_scenarios("chat")
    with pytest.raises(ConfigError, match="go together"):
        parse_scenarios(None, input_len=5)


def test_smollm2_prompts_have_exact_lengths(smollm2_gguf: Path, corpus: str) -> None:
    tokenizer, chat = load_prompt_tokenizer(str(smollm2_gguf))
    builder = PromptBuilder(corpus, tokenizer, chat)
    for scenario in SCENARIOS.values():
        prompts = [builder.build(scenario, i) for i in range(6)]
        for prompt in prompts:
            assert prompt.is_exact
            assert len(chat.encode(prompt.messages, tools=prompt.tools)) == scenario.input_len
        assert prompts[0].messages != prompts[1].messages  # different text per request
    roles = [m["role"] for m in builder.build(SCENARIOS["multiturn"], 0).messages]
    assert roles == ["user", "assistant"] * 3 + ["user"]


def test_mistral_v7_prompts_count_tools(tekken_path: Path, corpus: str) -> None:
    from levante.chat import MistralChatFormat
    from levante.tokenizer import MistralTokenizer

    tokenizer = MistralTokenizer.from_file(tekken_path)
    chat = MistralChatFormat(tokenizer)
    builder = PromptBuilder(corpus, tokenizer, chat)
    for scenario in SCENARIOS.values():
        for i in range(3):
            prompt = builder.build(scenario, i)
            ids = chat.encode(prompt.messages, tools=prompt.tools)
            assert len(ids) == scenario.input_len
            assert (5 in ids) == (scenario.name == "function")  # [AVAILABLE_TOOLS] counted


def test_without_a_tokenizer_lengths_are_approximate(corpus: str) -> None:
    prompt = PromptBuilder(corpus).build(Scenario("custom", 1000, 10), 0)
    assert not prompt.is_exact and prompt.num_tokens == 1000
    assert 3000 < len(prompt.messages[0]["content"]) <= 4000  # ~4 characters per token
