"""Mistral's chat format (V7 / Tekken) through mistral-common."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from levante.chat.messages import Message, check_messages, check_tools, request_error, to_mistral_id
from levante.errors import RequestError
from levante.tokenizer import MistralTokenizer

if TYPE_CHECKING:  # mistral-common and pydantic (~0.45 s to import) load for Tekken models only
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

def _with_mistral_ids(message: Message) -> Message:
    """A copy of `message` with OpenAI tool-call ids mapped by `to_mistral_id`."""
    message = {key: value for key, value in message.items() if value is not None}
    if isinstance(message.get("tool_call_id"), str):
        message["tool_call_id"] = to_mistral_id(message["tool_call_id"])
    if message.get("tool_calls"):
        message["tool_calls"] = [
            {**call, "id": to_mistral_id(call["id"])} if isinstance(call.get("id"), str) else call
            for call in message["tool_calls"]
        ]
    return message


def _describe(error: Exception) -> str:
    """A pydantic error as one short line per problem ("tool_calls.0.id: ..."), else str()."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    details = [
        f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
        for item in error.errors()[:3]
    ]
    return "; ".join(details)


class MistralChatFormat:
    """Mistral's instruct format (V7 for Mistral Small 3), encoded by mistral-common itself."""

    def __init__(self, tokenizer: MistralTokenizer) -> None:
        from mistral_common.protocol.instruct.normalize import get_normalizer
        from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
        from mistral_common.tokens.tokenizers.mistral import (
            MistralTokenizer as MistralCommonTokenizer,
        )

        self.tokenizer = tokenizer
        self._mistral = tokenizer.mistral
        tekken = tokenizer.mistral.instruct_tokenizer.tokenizer
        # Same encoder, validated without the "last message is user or tool" rule, so a
        # finished conversation (ending with an assistant turn) encodes for training/scoring.
        self._mistral_any_last = MistralCommonTokenizer(
            tokenizer.mistral.instruct_tokenizer,
            validator=get_validator(tekken.version, ValidationMode.agnostic),
            request_normalizer=get_normalizer(tekken.version, tekken.model_settings_builder),
        )

    def request(
        self, messages: list[Message], *, tools: list[dict[str, Any]] | None = None
    ) -> ChatCompletionRequest[Any]:
        """The mistral-common request for OpenAI-shaped messages (tool-call ids mapped)."""
        from mistral_common.protocol.instruct.converters import (
            convert_openai_messages,
            convert_openai_tools,
        )
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        check_messages(messages)
        if tools is not None:
            check_tools(tools)
        converted = []
        for index, message in enumerate(messages):
            try:
                converted.extend(convert_openai_messages([_with_mistral_ids(message)]))
            except ValueError as error:  # pydantic's ValidationError is a ValueError
                raise request_error(index, _describe(error)) from None
        try:
            mistral_tools = None if tools is None else convert_openai_tools(tools)
            return ChatCompletionRequest(messages=converted, tools=mistral_tools)
        except ValueError as error:
            raise RequestError(f"invalid tools: {_describe(error)}", param="tools") from None

    def encode(
        self,
        messages: list[Message],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Prompt ids; with add_generation_prompt the last message must be user or tool."""
        from mistral_common.exceptions import MistralCommonException

        request = self.request(messages, tools=tools)
        encoder = self._mistral if add_generation_prompt else self._mistral_any_last
        try:
            tokens: list[int] = encoder.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError) as error:
            problem = f"messages rejected by the Mistral chat format: {_describe(error)}"
            raise RequestError(problem, param="messages") from None
        return tokens
