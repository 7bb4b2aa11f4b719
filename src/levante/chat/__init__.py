"""Chat: messages, templates (Mistral V7, Jinja), tools, and request shaping per API.

`levante.chat.request` (what the server's routes call) is imported by name: it needs the
bundle, which needs the chat formats here.
"""

from levante.chat.jinja import JinjaChatFormat
from levante.chat.messages import ChatFormat, Message, check_messages, to_mistral_id
from levante.chat.mistral import MistralChatFormat
from levante.chat.sandbox import MAX_RENDER_CHARS

__all__ = ["MAX_RENDER_CHARS", "ChatFormat", "JinjaChatFormat", "Message", "MistralChatFormat",
           "check_messages", "to_mistral_id"]
