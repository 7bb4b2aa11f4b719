"""The post's workload scenarios and their prompts: real corpus text cut to exact token lengths."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from levante.errors import ConfigError, ModelFileError

# The post's headline speed, used for its "expected time" per scenario:
# expected = time to first token + output tokens / decode speed.
POST_TTFT_S = 0.476
POST_TOKENS_PER_S = 150.0
CHARS_PER_TOKEN = 4.0  # rule of thumb for English BPE text, used only without a tokenizer
MAX_FIT_ROUNDS = 12
MAX_SHIFTS = 4  # first-token shifts tried when no cut lands exactly on the length

SEARCH_TOOL = {"type": "function", "function": {
    "name": "search_knowledge_base",
    "description": "Search the company knowledge base and return the most relevant passages.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "what to look for"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 20},
        "section": {"type": "string", "enum": ["billing", "product", "legal", "support"]}},
        "required": ["query"]}}}
TICKET_TOOL = {"type": "function", "function": {
    "name": "create_ticket",
    "description": "Open a support ticket for a customer issue.",
    "parameters": {"type": "object", "properties": {
        "title": {"type": "string"}, "priority": {"type": "string",
                                                  "enum": ["low", "normal", "urgent"]},
        "summary": {"type": "string"}}, "required": ["title", "summary"]}}}


@dataclass(frozen=True)
class Scenario:
    """A workload: prompt tokens in, output tokens out, the task wording, turns and tools."""

    name: str
    input_len: int
    output_len: int
    instruction: str = "Continue the text."
    num_turns: int = 1  # user turns; between them the corpus text plays the assistant
    tools: tuple[dict[str, Any], ...] = field(default=(), hash=False)

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1 or self.num_turns < 1:
            raise ConfigError(f"scenario {self.name!r}: input_len, output_len and num_turns must "
                              f"be >= 1, got {self.input_len}, {self.output_len}, {self.num_turns}")

    @property
    def expected_s(self) -> float:
        """The post's expected end-to-end time: 0.476 s to first token + output / 150 tok/s."""
        return POST_TTFT_S + self.output_len / POST_TOKENS_PER_S


SCENARIOS = {s.name: s for s in (
    Scenario("faq", 500, 150, "Using only the document below, answer the question a customer "
             "would most likely ask about it."),
    Scenario("summary", 4000, 500, "Summarize the following document in a few paragraphs."),
    Scenario("codegen", 1000, 800, "Write a Python module that implements a small tool to "
             "index and search documents like the one below, with tests."),
    Scenario("function", 2000, 200, "A customer sent the message below. Use the tools to look "
             "up the relevant policy and open a ticket.", tools=(SEARCH_TOOL, TICKET_TOOL)),
    Scenario("multiturn", 8000, 300, "Given our conversation so far, what should we do next?",
             num_turns=4),
)}


def parse_scenarios(spec: str | None, *, input_len: int | None = None,
                    output_len: int | None = None) -> list[Scenario]:
    """'faq,summary' or 'all' -> scenarios; --input-len/--output-len add a 'custom' one."""
    if (input_len is None) != (output_len is None):
        raise ConfigError("--input-len and --output-len go together")
    chosen: list[Scenario] = []
    names = [] if spec is None else [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        if name == "all":
            chosen += SCENARIOS.values()
        elif name in SCENARIOS:
            chosen.append(SCENARIOS[name])
        else:
            raise ConfigError(f"unknown scenario {name!r}: choose from {', '.join(SCENARIOS)}, "
                              "all, or give --input-len/--output-len")
    if input_len is not None and output_len is not None:
        chosen.append(Scenario("custom", input_len, output_len))
    if not chosen:
        chosen.append(SCENARIOS["faq"])
    return list(dict.fromkeys(chosen))


def corpus_path() -> Path:
    """The text shipped with Levante that prompts are cut from."""
    return Path(str(resources.files("levante") / "data" / "corpus.txt"))


@dataclass(frozen=True)
class Prompt:
    """One request's messages and tools, and its prompt length as counted here."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    num_tokens: int
    is_exact: bool  # counted with the model's tokenizer and chat template, not approximated


class PromptBuilder:
    """Cuts corpus text into prompts of an exact token length.

    With the model's tokenizer (and chat format) the whole rendered request, tools included,
    is counted; without one (a remote model) length is approximated at 4 characters per token
    and the server's reported prompt_tokens is what the report shows. Each request starts at a
    different sentence, so prefix caches do not turn a benchmark into a cache test; the corpus
    is read round and round when a prompt needs more text than it holds.
    """

    def __init__(self, text: str, tokenizer: Any | None = None,
                 chat_format: Any | None = None) -> None:
        if not text.strip():
            raise ConfigError("the prompt corpus is empty")
        self.text = text
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        # prompts start at sentence beginnings: a few hundred distinct starts in the corpus
        self.starts = [0] + [m.end() for m in re.finditer(r"[.!?]\s+", text)
                             if m.end() < len(text)]

    @classmethod
    def from_corpus(cls, path: str | Path | None = None, tokenizer: Any | None = None,
                    chat_format: Any | None = None) -> PromptBuilder:
        """A builder over the shipped corpus (or another text file)."""
        path = Path(path) if path is not None else corpus_path()
        try:
            return cls(path.read_text(encoding="utf-8"), tokenizer, chat_format)
        except OSError as e:
            raise ModelFileError(path, f"cannot read prompt corpus ({e})") from None

    def build(self, scenario: Scenario, request_index: int) -> Prompt:
        """The prompt of request `request_index` in `scenario`, fitted to its input length."""
        start = self.starts[(request_index * 37) % len(self.starts)]
        chars = int(scenario.input_len * CHARS_PER_TOKEN * 2) + 64
        window = (self.text[start:] + "\n\n" + self.text) * math.ceil(
            chars / (len(self.text) + 2) + 1)
        window = window[:chars]
        if self.tokenizer is None:
            return self._fit_approx(scenario, window)
        return self._fit_exact(scenario, self.tokenizer.encode(window))

    def _fit_exact(self, scenario: Scenario, window_ids: list[int]) -> Prompt:
        """The longest prompt of at most input_len tokens, exactly input_len where some cut of
        the text gets there (a later first token changes how the cut merges: try a few)."""
        best: Prompt | None = None
        for shift in range(MAX_SHIFTS):
            prompt = self._fit_from(scenario, window_ids[shift:])
            if prompt is not None and (best is None or prompt.num_tokens > best.num_tokens):
                best = prompt
            if best is not None and best.num_tokens == scenario.input_len:
                break
        if best is None:
            raise ConfigError(f"scenario {scenario.name!r}: cannot fit a prompt in "
                              f"{scenario.input_len} tokens (the instruction alone is longer)")
        return best

    def _fit_from(self, scenario: Scenario, ids: list[int]) -> Prompt | None:
        """Search the number k of corpus tokens: count(k) - k is the template's (nearly
        constant) overhead, so step by the shortfall; creep by one when a step repeats."""
        target, tools = scenario.input_len, list(scenario.tools) or None
        num_messages = _num_messages(scenario)
        probe = min(8 * num_messages, len(ids))
        overhead = self._count(self._messages(scenario, self._chunks(ids[:probe], 8, num_messages)),
                               tools) - probe
        size = max((target - overhead) // num_messages, 1)  # tokens per message but the last
        k, tried = target - overhead, set()
        best: Prompt | None = None
        for _ in range(MAX_FIT_ROUNDS):
            if not num_messages <= k <= len(ids) or k in tried:
                break
            tried.add(k)
            messages = self._messages(scenario, self._chunks(ids[:k], size, num_messages))
            count = self._count(messages, tools)
            if count <= target and (best is None or count > best.num_tokens):
                best = Prompt(messages, tools, count, is_exact=True)
            if count == target:
                break
            step = k + target - count
            k = step if step not in tried else k + (1 if count < target else -1)
        return best

    def _fit_approx(self, scenario: Scenario, window: str) -> Prompt:
        tools = list(scenario.tools) or None
        overhead = len(str(tools or "")) + len(scenario.instruction) + 16 * scenario.num_turns
        num_chars = max(int(scenario.input_len * CHARS_PER_TOKEN) - overhead, 1)
        text = window[:num_chars]
        size = math.ceil(len(text) / _num_messages(scenario))
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        return Prompt(self._messages(scenario, chunks), tools, scenario.input_len,
                      is_exact=False)

    def _chunks(self, ids: list[int], size: int, num_messages: int) -> list[str]:
        """`ids` as message texts: `size` tokens each, the last message takes the rest (so one
        more id only grows the last text); each decoded on its own."""
        cuts = [i * size for i in range(num_messages)]
        pieces = [ids[a:b] for a, b in zip(cuts, cuts[1:] + [len(ids)])]
        return [self.tokenizer.decode(piece).strip("\ufffd") for piece in pieces]

    def _count(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
        if self.chat_format is not None:
            return len(self.chat_format.encode(messages, tools=tools))
        text = "\n".join(m["content"] for m in messages)
        return len(self.tokenizer.encode(text, add_bos=self.tokenizer.should_add_bos))

    @staticmethod
    def _messages(scenario: Scenario, chunks: list[str]) -> list[dict[str, Any]]:
        """Single turn: instruction + text. Multi-turn: the chunks as alternating user/assistant
        messages, ending with a user turn that carries the instruction."""
        chunks = chunks + [""] * (_num_messages(scenario) - len(chunks))
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": chunk}
                    for i, chunk in enumerate(chunks)]
        messages[-1]["content"] = f"{scenario.instruction}\n\n{messages[-1]['content']}"
        return messages


def _num_messages(scenario: Scenario) -> int:
    return 2 * scenario.num_turns - 1


def load_prompt_tokenizer(ref: str) -> tuple[Any, Any | None]:
    """The tokenizer and chat format of a local model ref, without loading its weights."""
    from levante.bundle import load_tokenizer
    from levante.chat import JinjaChatFormat
    from levante.tokenizer import HFTokenizer
    from levante.weights.gguf import GGUFFile
    from levante.weights.hub import resolve

    path = resolve(ref)
    if path.is_dir():
        return load_tokenizer(path)
    meta = GGUFFile(path).metadata
    tokenizer = HFTokenizer.from_gguf_metadata(meta)
    chat = JinjaChatFormat.from_gguf_metadata(meta, tokenizer) \
        if meta.get("tokenizer.chat_template") else None
    return tokenizer, chat
