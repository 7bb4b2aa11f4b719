"""Training data: chat JSONL to token ids with an assistant-only loss mask, mixing, batches."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from levante.chat import ChatFormat, Message
from levante.errors import ConfigError, RequestError


@dataclass(frozen=True)
class Conversation:
    """One JSONL line: OpenAI-style messages (and tools), with where it came from."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None
    source: str  # "path:line"


@dataclass(frozen=True)
class Example:
    """Token ids of a whole conversation; `target_mask[i]` marks ids the loss should predict."""

    token_ids: list[int]
    target_mask: list[bool]
    source: str

    @property
    def num_targets(self) -> int:
        """How many tokens the loss covers (the assistant turns)."""
        return sum(self.target_mask)


@dataclass
class DataReport:
    """What loading found: problems by file:line, and how many sequences were truncated."""

    num_examples: int = 0
    num_truncated: int = 0
    num_dropped: int = 0  # truncation left no assistant token
    problems: list[str] = field(default_factory=list)
    mixed: dict[str, int] = field(default_factory=dict)  # file -> examples drawn from it

    def lines(self, max_seq_len: int) -> list[str]:
        """Human-readable summary lines (the CLI prints them)."""
        out = [f"skipped {p}" for p in self.problems]
        if self.num_truncated:
            out.append(f"{self.num_truncated} sequence(s) longer than {max_seq_len} tokens "
                       "truncated")
        if self.num_dropped:
            out.append(f"{self.num_dropped} sequence(s) dropped: no assistant token left "
                       f"within {max_seq_len} tokens")
        out.extend(f"mixed in {n} example(s) from {name}" for name, n in self.mixed.items())
        return out


class _BadLine(Exception):
    """A JSONL line that is not a chat example; the message says why."""


def _conversation(path: Path, number: int, line: str) -> Conversation:
    """Parse one line; _BadLine with the reason if it is not a chat example."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadLine(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadLine("'messages' must be a non-empty list")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise _BadLine("no assistant message to learn from")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _BadLine("'tools' must be a list")
    return Conversation(messages, tools, f"{path}:{number}")


def read_conversations(path: Path, *, strict: bool = False,
                       problems: list[str] | None = None) -> list[Conversation]:
    """Conversations of a JSONL file; a bad line is appended to `problems` as "file:line: why"
    and skipped, or raised as ConfigError when `strict`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read training data ({e})") from None
    conversations = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            conversations.append(_conversation(path, number, line))
        except _BadLine as e:
            _problem(f"{path}:{number}: {e}", strict, problems)
    return conversations


def _problem(message: str, strict: bool, problems: list[str] | None) -> None:
    if strict:
        raise ConfigError(message)
    if problems is not None:
        problems.append(message)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _find(haystack: Sequence[int], needle: Sequence[int], start: int) -> int | None:
    """First index >= start where `needle` occurs in `haystack`."""
    last = len(haystack) - len(needle)
    for i in range(start, last + 1):
        if haystack[i:i + len(needle)] == needle:
            return i
    return None


def encode_conversation(chat_format: ChatFormat, conversation: Conversation, *,
                        eos_ids: frozenset[int]) -> Example:
    """Ids of the whole conversation in the model's chat format, with the loss on assistant turns.

    Assistant turn i's ids are what encoding messages[:i+1] adds to the prompt for messages[:i]
    (so the template's own header, e.g. "<|im_start|>assistant\\n", stays unmasked), cut after
    the end-of-turn token; they are then located in the full encoding, searching forward. The
    search (rather than assuming the prefix is kept) covers formats that move earlier parts as a
    conversation grows: Mistral V7 puts [AVAILABLE_TOOLS] before the *last* user message.
    Raises RequestError if the format rejects the conversation.
    """
    messages, tools = conversation.messages, conversation.tools
    full = chat_format.encode(messages, tools=tools, add_generation_prompt=False)
    mask = [False] * len(full)
    cursor = 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = chat_format.encode(messages[:i], tools=tools) if i else []
        through = chat_format.encode(messages[:i + 1], tools=tools, add_generation_prompt=False)
        turn = _until_eos(through[_common_prefix(prompt, through):], eos_ids)
        start = _find(full, turn, cursor) if turn else None
        if start is None:
            raise RequestError(f"messages[{i}]: assistant tokens not found in the encoded "
                               "conversation (chat format is not prefix-stable)")
        mask[start:start + len(turn)] = [True] * len(turn)
        cursor = start + len(turn)
    return Example(full, mask, conversation.source)


def _until_eos(ids: list[int], eos_ids: frozenset[int]) -> list[int]:
    """`ids` up to and including the last end-of-sequence token (what follows is never sampled)."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] in eos_ids:
            return ids[:i + 1]
    return ids


def truncate(example: Example, max_seq_len: int) -> Example:
    """The first `max_seq_len` tokens of `example` (callers count and report truncation)."""
    return Example(example.token_ids[:max_seq_len], example.target_mask[:max_seq_len],
                   example.source)


def load_examples(path: Path, chat_format: ChatFormat, *, eos_ids: frozenset[int],
                  max_seq_len: int, strict: bool = False,
                  report: DataReport | None = None) -> list[Example]:
    """Read, encode and truncate one JSONL file; problems and counts go into `report`."""
    report = report if report is not None else DataReport()
    examples = []
    for conversation in read_conversations(path, strict=strict, problems=report.problems):
        try:
            example = encode_conversation(chat_format, conversation, eos_ids=eos_ids)
        except RequestError as e:
            _problem(f"{conversation.source}: {e}", strict, report.problems)
            continue
        if len(example.token_ids) > max_seq_len:
            report.num_truncated += 1
            example = truncate(example, max_seq_len)
            if not example.num_targets:
                report.num_dropped += 1
                continue
        examples.append(example)
    report.num_examples += len(examples)
    return examples


def parse_mix(spec: str) -> tuple[Path, float]:
    """"general.jsonl:0.2" -> (Path("general.jsonl"), 0.2): that file at a 20% share."""
    path, sep, share_text = spec.rpartition(":")
    try:
        share = float(share_text)
    except ValueError:
        share = -1.0
    if not sep or not path or not 0 < share < 1:
        raise ConfigError(f"--mix {spec!r}: expected FILE:SHARE with 0 < SHARE < 1, "
                          "e.g. general.jsonl:0.2")
    return Path(path), share


def mix_examples(primary: list[Example], extras: list[tuple[str, list[Example], float]], *,
                 seed: int = 0, report: DataReport | None = None) -> list[Example]:
    """Primary examples plus each extra set at its share of the result, shuffled.

    With shares s_j, extra j contributes round(n * s_j / (1 - sum s)) examples, n = len(primary):
    e.g. 800 domain examples and general:0.2 give 200 general ones (80/20). An extra set
    smaller than its quota is drawn again from the start after a reshuffle.
    """
    total_share = sum(share for _, _, share in extras)
    if total_share >= 1:
        raise ConfigError(f"--mix shares add up to {total_share:g}; they must stay below 1")
    rng = random.Random(seed)
    mixed = list(primary)
    for name, examples, share in extras:
        if not examples:
            raise ConfigError(f"--mix {name}: no usable examples")
        quota = round(len(primary) * share / (1 - total_share))
        drawn: list[Example] = []
        while len(drawn) < quota:
            order = list(examples)
            rng.shuffle(order)
            drawn.extend(order[:quota - len(drawn)])
        mixed.extend(drawn)
        if report is not None:
            report.mixed[name] = len(drawn)
    rng.shuffle(mixed)
    return mixed


def collate(examples: Sequence[Example], *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B, S] and target mask [B, S] (False on padding)."""
    length = max(len(e.token_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.token_ids)
        ids[row, :n] = torch.tensor(example.token_ids, dtype=torch.long)
        mask[row, :n] = torch.tensor(example.target_mask, dtype=torch.bool)
    return ids, mask
