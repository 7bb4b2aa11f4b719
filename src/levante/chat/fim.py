"""Fill-in-the-middle prompts: whether a model has a FIM format, and its prompt for a prefix and
a suffix (the `suffix` of /v1/completions and of Ollama's /api/generate).

Two formats, by tokenizer:

- **Tekken** (mistral-common): `encode_fim`, Codestral's order,
  `<s> [SUFFIX] suffix [PREFIX] prefix`; the model writes the middle. mistral-common allows it
  from instruct version V2 on (V1 raises TokenizerException), so every version served here
  (V3, V7, V11, V13) has it. The tokenizer cannot tell whether the weights were trained on it.
- **HF / GGUF byte-level BPE**: llama.cpp's /infill order,
  `[BOS] <FIM_PRE> prefix <FIM_SUF> suffix <FIM_MID>`, BOS where the model adds one. The three
  ids come from a GGUF's `tokenizer.ggml.fim_{pre,suf,mid}_token_id` (or the older
  `prefix/suffix/middle_token_id`), else, as llama.cpp does, from a vocabulary entry spelled as
  one of FIM_TOKEN_TEXTS ("<fim_prefix>" StarCoder/Granite, "<|fim_prefix|>" Qwen, ...).

Prefix and suffix are encoded as plain text: "<fim_middle>" typed in the code is not a control
token (llama.cpp tokenizes them with parse_special off too).
"""

from __future__ import annotations

from levante.errors import RequestError
from levante.tokenizer import HFTokenizer, MistralTokenizer, Tokenizer

# llama.cpp's fallback spellings (src/llama-vocab.cpp) of each FIM token, by role.
FIM_TOKEN_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
            "▁<PRE>", "<|code_prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
            "▁<SUF>", "<|code_suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
            "▁<MID>", "<|code_middle|>"),
}


def fim_token_ids(tokenizer: HFTokenizer) -> tuple[int, int, int] | None:
    """(prefix, suffix, middle) token ids of an HF/GGUF vocabulary, or None if one is missing."""
    found = []
    for role, texts in FIM_TOKEN_TEXTS.items():
        token_id = tokenizer.named_fim_ids.get(role)
        if token_id is None:
            token_id = next((i for i in map(tokenizer.backend.token_to_id, texts)
                             if i is not None), None)
        if token_id is None:
            return None
        found.append(int(token_id))
    return found[0], found[1], found[2]


def supports_fim(tokenizer: Tokenizer) -> bool:
    """Whether `tokenizer` has a fill-in-the-middle format (Ollama's "insert" capability)."""
    if isinstance(tokenizer, MistralTokenizer):
        return _mistral_fim_ids(tokenizer, "", "x") is not None
    return isinstance(tokenizer, HFTokenizer) and fim_token_ids(tokenizer) is not None


def fim_prompt_ids(tokenizer: Tokenizer, prefix: str, suffix: str, *, model: str) -> list[int]:
    """Prompt ids asking the model for the text between `prefix` and `suffix`; RequestError
    (param "suffix") naming `model` when it has no FIM format."""
    ids: list[int] | None = None
    if isinstance(tokenizer, MistralTokenizer):
        ids = _mistral_fim_ids(tokenizer, prefix, suffix)
    elif isinstance(tokenizer, HFTokenizer) and (fim := fim_token_ids(tokenizer)) is not None:
        pre_id, suf_id, mid_id = fim
        bos = [tokenizer.bos_id] if tokenizer.should_add_bos and tokenizer.bos_id is not None else []
        ids = [*bos, pre_id, *tokenizer.encode_text(prefix), suf_id,
               *tokenizer.encode_text(suffix), mid_id]
    if ids is None:
        raise RequestError(f"model {model!r} does not support suffix (fill-in-the-middle): its "
                           f"tokenizer has no FIM prefix/suffix/middle tokens", param="suffix",
                           code="unsupported_parameter")
    return ids


def _mistral_fim_ids(tokenizer: MistralTokenizer, prefix: str, suffix: str) -> list[int] | None:
    """mistral-common's FIM prompt, or None where its instruct version has none."""
    from mistral_common.exceptions import TokenizerException
    from mistral_common.protocol.fim.request import FIMRequest

    try:
        return list(tokenizer.mistral.encode_fim(FIMRequest(prompt=prefix, suffix=suffix)).tokens)
    except TokenizerException:
        return None
