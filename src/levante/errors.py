"""The few exceptions Levante raises for bad input; the server maps them to OpenAI errors."""

from __future__ import annotations

from pathlib import Path


class LevanteError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class ModelFileError(LevanteError):
    """A model file is missing, truncated, corrupt or disagrees with its config."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class ModelRefError(LevanteError):
    """A model reference names nothing Levante can find or fetch."""


class ConfigError(LevanteError):
    """A configuration value is out of range or inconsistent."""


class RequestError(LevanteError):
    """A request is invalid; `param` names the offending field, `code` is OpenAI's code."""

    status_code = 400

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        self.param = param
        self.code = code
        super().__init__(message)


class ContextLengthError(RequestError):
    """Prompt plus requested output does not fit the model's context window."""

    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")
