"""Closed sets of names compared across layers: finish reasons and weight formats, as str enums."""

from __future__ import annotations

import enum


class StrEnum(str, enum.Enum):
    """A str-valued enum that prints, formats and serializes as its plain value.

    `enum.StrEnum` from Python 3.11, for 3.10: a member equals its value
    (`FinishReason.STOP == "stop"`), `json.dumps` writes `"stop"`, and `str()` and f-strings
    give `stop` (a plain `(str, Enum)` gives `FinishReason.STOP` there from 3.11).
    """

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(str(self), format_spec)


class FinishReason(StrEnum):
    """Why a request's output ended: OpenAI's `finish_reason` (Ollama's `done_reason`)."""

    STOP = "stop"  # EOS, a stop string or token, or a grammar's complete output
    LENGTH = "length"  # max_tokens or the context
    TOOL_CALLS = "tool_calls"  # stopped after tool calls (the server and LLM.chat say so)
    ABORT = "abort"  # the client left or the server shut down
    ERROR = "error"  # the request failed alone (its neighbours go on)


class WeightFormat(StrEnum):
    """How a model's weights are stored on disk (`levante list`, `Bundle.format`)."""

    GGUF = "gguf"  # one .gguf file
    SAFETENSORS_HF = "safetensors-hf"  # an HF folder: config.json and model*.safetensors
    SAFETENSORS_CONSOLIDATED = "safetensors-consolidated"  # Mistral's params.json folder
