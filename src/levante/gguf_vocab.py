"""GGUF vocabularies (`tokenizer.ggml.*` metadata) rebuilt as tokenizers: Tekken, byte-level BPE.

**Tekken** (`tokenizer.ggml.pre` "tekken": every Mistral Small 3 GGUF, from llama.cpp's
converter, Ollama or `levante quantize`) is rebuilt as mistral-common's own `Tekkenizer`, so a
GGUF tokenizes, and builds chat prompts, exactly as the model's tekken.json folder does:

    ids 0..S-1   control tokens (token_type CONTROL; "<unk>", "<s>", "</s>", "[INST]", ...):
                 Tekken's special tokens, by name, at the same ids (S = 1000 for V7)
    ids S..N-1   BPE tokens as GPT-2 byte-level strings: "Ġthe" -> b" the"; rank = id - S
    pattern      Tekken's pre-tokenizer regex (TEKKEN_PATTERN), which llama.cpp hard-codes
                 for "tekken" too: the GGUF does not store it
    version      V7 (Mistral Small 3's): the GGUF does not record an instruct version

Merges are not read: Tekken is tiktoken, whose BPE merges by the rank of the merged bytes
(llama.cpp reproduces that from rank-ordered merges and `ignore_merges`). Why not HF
`tokenizers` for Tekken: a BPE with added special tokens turns user-typed "[TOOL_CALLS]"
into control token 9 (a prompt injection); mistral-common encodes it as plain text, and its
V7 instruct encoder is the reference chat format (system prompt, tools before the last user
message, tool calls and results), so a Tekken GGUF's own Jinja template is not used either.

The file records no instruct version, so what the control tokens allow is decided here: a GGUF
whose control tokens include ones only newer tokenizers define ("[ARGS]", "[CALL_ID]",
"[THINK]": V11 and later) is refused rather than given a guessed format the model was not
trained on; a V3-era Tekken file (Mistral Nemo) has V7's control tokens and gets V7 too.

**Byte-level BPE** (every other `pre`) becomes a HF `tokenizers` BPE with the pre-tokenizer
llama.cpp uses for that name (`GGUF_PRE_TOKENIZERS`, src/llama-vocab.cpp), control tokens as
added special tokens; other names are refused with the list of supported ones.

Metadata is untrusted: a malformed field is a ModelFileError naming the file and the field.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFBackend

from levante.errors import ModelFileError

if TYPE_CHECKING:  # mistral-common (~0.45 s to import) loads only for a Tekken vocabulary
    from mistral_common.tokens.tokenizers.tekken import SpecialTokenInfo, Tekkenizer, TokenInfo

TEKKEN_PRE = "tekken"
GGUF_NORMAL_TOKEN = 1  # llama.cpp's LLAMA_TOKEN_TYPE_NORMAL
GGUF_UNKNOWN_TOKEN = 2  # LLAMA_TOKEN_TYPE_UNKNOWN ("<unk>" in some converters)
GGUF_CONTROL_TOKEN = 3  # LLAMA_TOKEN_TYPE_CONTROL
GGUF_USER_DEFINED_TOKEN = 4  # LLAMA_TOKEN_TYPE_USER_DEFINED: matched whole, but not special
GGUF_UNUSED_TOKEN = 5  # LLAMA_TOKEN_TYPE_UNUSED

# config.pattern of Mistral's tekken.json files (and of mistral-common's shipped ones); llama.cpp
# quotes the same expression as the "original regex" of LLAMA_VOCAB_PRE_TYPE_TEKKEN.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_VERSION = "v7"  # mistral-common's TokenizerVersion.v7
# Control tokens the Tekkenizer and V7 instruct encoder look up by name.
V7_CONTROL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
                     "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]",
                     "[PREFIX]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                     "[TOOL_CONTENT]")


@cache
def newer_control_tokens() -> frozenset[str]:
    """Control tokens only tokenizers newer than V7 define ("[ARGS]", "[CALL_ID]", "[THINK]"...)."""
    from mistral_common.tokens.tokenizers.base import SpecialTokens
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    return frozenset(str(t.value) for t in SpecialTokens) - frozenset(
        str(t["token_str"]) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS)


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map: printable bytes stand for themselves, others shift past 255.

    Example: b" " (0x20) -> "Ġ" (U+0120), b"\\n" -> "Ċ", b"a" -> "a", 0xE4 -> "ä".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in alphabet)
    alphabet.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return alphabet


def _field(meta: Mapping[str, Any], key: str, path: str | Path) -> Any:
    """A required metadata field, or ModelFileError naming it."""
    if key not in meta:
        raise ModelFileError(path, f"GGUF metadata lacks {key!r}, needed to build the tokenizer")
    return meta[key]


def _strings(meta: Mapping[str, Any], key: str, path: str | Path) -> list[str]:
    """A required array of strings."""
    values = _field(meta, key, path)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ModelFileError(path, f"{key} must be an array of strings")
    return values


def _token_types(meta: Mapping[str, Any], num_tokens: int, path: str | Path) -> list[int]:
    """`tokenizer.ggml.token_type`: one integer per token."""
    key = "tokenizer.ggml.token_type"
    types = _field(meta, key, path)
    if not isinstance(types, list) or not all(type(t) is int for t in types):
        raise ModelFileError(path, f"{key} must be an array of integers")
    if len(types) != num_tokens:
        raise ModelFileError(path, f"{key} has {len(types)} entries for {num_tokens} tokens")
    return types


def tekken_json_from_gguf(meta: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """A Tekken GGUF's vocabulary as a tekken.json object (V7, special tokens listed)."""
    tokens = _strings(meta, "tokenizer.ggml.tokens", path)
    types = _token_types(meta, len(tokens), path)
    num_special = _num_control_tokens(types, path)
    vocab = _tekken_vocab(tokens[num_special:], num_special, path)
    config = {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": len(vocab),
              "default_vocab_size": len(tokens), "default_num_special_tokens": num_special,
              "version": TEKKEN_VERSION}
    return {"config": config, "vocab": vocab,
            "special_tokens": _tekken_special_tokens(tokens[:num_special], path)}


def tekkenizer_from_gguf(meta: Mapping[str, Any], path: str | Path) -> Tekkenizer:
    """mistral-common's Tekkenizer (V7) from a Tekken GGUF's tokens and token types."""
    from mistral_common.tokens.tokenizers.base import TokenizerVersion
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = tekken_json_from_gguf(meta, path)
    config = data["config"]
    try:
        return Tekkenizer(data["vocab"], data["special_tokens"], config["pattern"],
                          config["default_vocab_size"], config["default_num_special_tokens"],
                          TokenizerVersion(config["version"]), name=Path(path).stem)
    except (AssertionError, ValueError) as error:  # checked above; mistral-common's own checks
        raise ModelFileError(path, f"not a valid Tekken vocabulary: {error!r}") from None


def _num_control_tokens(types: list[int], path: str | Path) -> int:
    """How many leading tokens are control tokens; every later one must be a normal token.

    Converters type Tekken's special ids CONTROL, some "<unk>" UNKNOWN; all are Tekken's.
    """
    special_types = (GGUF_CONTROL_TOKEN, GGUF_UNKNOWN_TOKEN, GGUF_USER_DEFINED_TOKEN,
                     GGUF_UNUSED_TOKEN)
    num_special = next((i for i, t in enumerate(types) if t not in special_types), len(types))
    bad = 0 if num_special == 0 else next(
        (i for i in range(num_special, len(types)) if types[i] != GGUF_NORMAL_TOKEN), None)
    if bad is not None and bad < len(types):
        raise ModelFileError(path, f"tokenizer.ggml.token_type: a Tekken vocabulary has its "
                                   f"control tokens first, then only normal (type 1) tokens; "
                                   f"token {bad} has type {types[bad]}")
    if num_special == 0:
        raise ModelFileError(path, "tokenizer.ggml.token_type: no control tokens")
    return num_special


def _tekken_special_tokens(names: list[str], path: str | Path) -> list[SpecialTokenInfo]:
    """Tekken's special-token list from the control tokens' names; V7's must be among them."""
    key = "tokenizer.ggml.tokens"
    if len(set(names)) != len(names) or "" in names:
        repeated = sorted({name for name in names if names.count(name) > 1})[:5]
        raise ModelFileError(path, f"{key}: control token names must be unique and non-empty "
                                   f"(repeated: {repeated})")
    missing = [name for name in V7_CONTROL_TOKENS if name not in names]
    if missing:
        raise ModelFileError(path, f"{key}: a Tekken (V7) vocabulary needs control tokens "
                                   f"{', '.join(missing)} among its first {len(names)}")
    newer = sorted(newer_control_tokens().intersection(names))
    if newer:
        raise ModelFileError(path, f"{key}: control tokens {', '.join(newer)} belong to a Tekken "
                                   f"tokenizer newer than V7, whose instruct version the GGUF does "
                                   f"not record; load the model's folder with its tekken.json")
    from mistral_common.tokens.tokenizers.tekken import SpecialTokenInfo

    return [SpecialTokenInfo(rank=i, token_str=name, is_control=True)
            for i, name in enumerate(names)]


def _tekken_vocab(pieces: list[str], num_special: int, path: str | Path) -> list[TokenInfo]:
    """Tekken's ranked vocabulary from byte-level token strings (rank = position)."""
    from mistral_common.tokens.tokenizers.tekken import TokenInfo

    key = "tokenizer.ggml.tokens"
    to_byte = {char: byte for byte, char in byte_level_alphabet().items()}
    vocab: list[TokenInfo] = []
    seen: set[bytes] = set()
    for rank, piece in enumerate(pieces):
        token_id = rank + num_special
        try:
            data = bytes(to_byte[char] for char in piece)
        except KeyError:
            raise ModelFileError(path, f"{key}: token {token_id} {piece[:40]!r} is not a "
                                       f"byte-level string") from None
        if (rank < 256 and data != bytes([rank])) or not data or data in seen:
            expected = f"the byte {rank:#04x}" if rank < 256 else "a new, non-empty byte string"
            raise ModelFileError(path, f"{key}: token {token_id} must be {expected} (Tekken rank "
                                       f"{rank}), got {data[:40]!r}")
        seen.add(data)
        vocab.append(TokenInfo(rank=rank, token_bytes=base64.b64encode(data).decode(),
                               token_str=None))
    if len(vocab) < 256:
        raise ModelFileError(path, f"{key}: a Tekken vocabulary needs all 256 byte tokens after "
                                   f"its {num_special} control tokens, got {len(vocab)}")
    return vocab


# llama.cpp's regexes (src/llama-vocab.cpp) for byte-level BPE pre-tokenizer names.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# LLAMA_VOCAB_PRE_TYPE_DEFAULT: punctuation runs, GPT-2's regex, digit runs, then digit triples.
DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")
LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe")


def _splits(*patterns: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's regex_exprs: each regex in turn splits every piece (matches kept), then bytes."""
    return pre_tokenizers.Sequence(
        [*(pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# What llama.cpp's `tokenizer.ggml.pre` names mean, as HF pre-tokenizers. "gpt2" is what
# `levante quantize` writes for a tokenizer.json it cannot name (llama.cpp says "gpt-2").
# "smollm" is how SmolLM2's own tokenizer.json splits (digits one by one, then GPT-2's regex);
# llama.cpp's regexes for it agree. transformers' GGUF loader maps it to plain GPT-2 instead.
GGUF_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    **{name: (lambda: _splits(LLAMA3_SPLIT)) for name in LLAMA3_NAMES},
    "default": lambda: _splits(*DEFAULT_SPLITS),
}
# llama.cpp's `ignore_merges` (a piece that is a whole token is that token) and `add_bos`
# defaults (used when the file has no `tokenizer.ggml.add_bos_token`) per name.
IGNORES_MERGES = frozenset(LLAMA3_NAMES)
ADDS_BOS_BY_DEFAULT = frozenset(LLAMA3_NAMES)


def bpe_backend_from_gguf(meta: Mapping[str, Any], path: str | Path) -> HFBackend:
    """A `tokenizers` byte-level BPE rebuilt from GGUF vocab, merges and token types."""
    model = _field(meta, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise ModelFileError(
            path, f"tokenizer.ggml.model {model!r} is not supported (only 'gpt2' byte-level BPE)"
        )
    pre = _field(meta, "tokenizer.ggml.pre", path)
    if pre not in GGUF_PRE_TOKENIZERS:
        known = ", ".join(sorted([*GGUF_PRE_TOKENIZERS, TEKKEN_PRE]))
        raise ModelFileError(path, f"tokenizer.ggml.pre {pre!r} is not supported ({known})")
    tokens = _strings(meta, "tokenizer.ggml.tokens", path)
    # tuples of the split, lengths checked at once: half the time of unpacking each pair
    pairs = [tuple(m.split(" ", 1)) for m in _strings(meta, "tokenizer.ggml.merges", path)]
    if pairs and min(map(len, pairs)) != 2:
        raise ModelFileError(path, "tokenizer.ggml.merges has an entry that is not 'left right'")
    merges = cast("list[tuple[str, str]]", pairs)
    vocab = dict(zip(tokens, range(len(tokens))))
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in IGNORES_MERGES)
    backend = HFBackend(bpe)
    backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, meta.get("tokenizer.ggml.token_type", ())))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in typed if k == GGUF_CONTROL_TOKEN]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in typed
            if k == GGUF_USER_DEFINED_TOKEN
        ]
    )
    return backend


# llama.cpp's fill-in-the-middle token keys (gguf-py Keys.Tokenizer), by role: the current
# name, then the older one llama.cpp still reads (prefix/suffix/middle_token_id).
GGUF_FIM_KEYS = {
    "pre": ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
    "suf": ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
    "mid": ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
}


def fim_ids_from_gguf(meta: Mapping[str, Any], num_tokens: int,
                      path: str | Path) -> dict[str, int]:
    """The FIM token ids a GGUF names, by role ("pre", "suf", "mid"); roles it does not name are
    left out (chat.fim then looks for the token by its text, as llama.cpp does)."""
    found = {}
    for role, keys in GGUF_FIM_KEYS.items():
        key = next((k for k in keys if k in meta), None)
        if key is None:
            continue
        value = meta[key]
        if type(value) is not int or not 0 <= value < num_tokens:
            raise ModelFileError(path, f"{key} is {value!r}, not a token id below {num_tokens}")
        found[role] = value
    return found
