"""Tokenizers: Tekken through mistral-common (from tekken.json or a GGUF), HF `tokenizers` (from
tokenizer.json or a GGUF's vocab), and streaming detokenization. GGUF vocabularies: gguf_vocab."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from tokenizers import Tokenizer as HFBackend

from levante.errors import ModelFileError
from levante.gguf_vocab import (
    ADDS_BOS_BY_DEFAULT,
    TEKKEN_PRE,
    bpe_backend_from_gguf,
    fim_ids_from_gguf,
    tekkenizer_from_gguf,
)

if TYPE_CHECKING:  # mistral-common (~0.45 s to import) loads only for a Tekken model
    from mistral_common.tokens.tokenizers.base import TokenizerVersion
    from mistral_common.tokens.tokenizers.mistral import (
        MistralTokenizer as MistralCommonTokenizer,
    )
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    """What the engine, chat formats and server need from any tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_ids: frozenset[int]
    should_add_bos: bool  # whether a raw (non-chat) prompt starts with BOS for this model

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token text inside it is matched as the tokenizer defines."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of `ids`; incomplete UTF-8 sequences become U+FFFD."""
        ...

    def token_text(self, token_id: int) -> str:
        """Display text of one token (special tokens included), e.g. for logprobs."""
        ...

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a control/special token."""
        ...

    def max_token_chars(self) -> int | None:
        """The most characters of input text one token can stand for, or None where a
        normalizer makes that unbounded: a text longer than context x this cannot fit, which
        the server says without tokenizing it (a 1 MB prompt)."""
        ...


def longer_than_chars(tokenizer: Tokenizer, num_chars: int, num_tokens: int) -> bool:
    """Whether a text of `num_chars` characters surely encodes to more than `num_tokens`
    tokens, without encoding it."""
    per_token = tokenizer.max_token_chars()
    return per_token is not None and num_chars > num_tokens * per_token


def _instruct_tokenizers() -> dict[TokenizerVersion, Callable[[Tekkenizer], Any]]:
    """Instruct encoders by tokenizer version; V7 is Mistral Small 3's."""
    from mistral_common.tokens.tokenizers.base import TokenizerVersion
    from mistral_common.tokens.tokenizers.instruct import (
        InstructTokenizerV3,
        InstructTokenizerV7,
        InstructTokenizerV11,
        InstructTokenizerV13,
    )

    return {TokenizerVersion.v3: InstructTokenizerV3, TokenizerVersion.v7: InstructTokenizerV7,
            TokenizerVersion.v11: InstructTokenizerV11,
            TokenizerVersion.v13: InstructTokenizerV13}


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or ModelFileError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ModelFileError(path, f"cannot read: {error}") from error
    except json.JSONDecodeError as error:
        raise ModelFileError(path, f"not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ModelFileError(path, "expected a JSON object")
    return data


def _load_tekken(path: Path, version: str) -> Tekkenizer:
    """A Tekkenizer from a tekken.json, with its own special tokens or V7's deprecated list.

    mistral-common's shipped tekken_240911.json is labelled v3 and has no special-token list;
    Mistral-Small-3 repos' tekken.json carry both. A file's own list wins (with its version).
    """
    from mistral_common.tokens.tokenizers.base import TokenizerVersion
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = _read_json(path)
    if "special_tokens" in data:
        try:
            return Tekkenizer.from_file(path)
        except (ValueError, KeyError, AssertionError) as error:
            raise ModelFileError(path, f"not a valid Tekken tokenizer: {error!r}") from error
    try:
        tokenizer_version = TokenizerVersion(version)
    except ValueError as error:
        raise ModelFileError(path, f"unknown tokenizer version {version!r}") from error
    try:
        config = data["config"]
        return Tekkenizer(
            data["vocab"],
            list(Tekkenizer.DEPRECATED_SPECIAL_TOKENS),
            config["pattern"],
            config["default_vocab_size"],
            config["default_num_special_tokens"],
            tokenizer_version,
            name=path.stem,
            _path=path,
        )
    except (KeyError, TypeError, AssertionError) as error:
        raise ModelFileError(path, f"not a valid Tekken tokenizer: {error!r}") from error


class MistralTokenizer:
    """Tekken through mistral-common; `.mistral` is the mistral-common tokenizer for chat encoding.

    Plain `encode` never produces control tokens: user text "[INST]" stays text.
    """

    def __init__(self, mistral: MistralCommonTokenizer[Any, Any, Any, Any, Any]) -> None:
        self.mistral = mistral
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        self._tekken = cast("Tekkenizer", mistral.instruct_tokenizer.tokenizer)  # the Tekken path
        self._skip_special, self._keep_special = SpecialTokenPolicy.IGNORE, SpecialTokenPolicy.KEEP
        self.vocab_size = self._tekken.n_words
        self.bos_id: int | None = self._tekken.bos_id
        self.eos_ids = frozenset({self._tekken.eos_id})
        self.should_add_bos = True
        self._max_token_chars: int | None = None

    @classmethod
    def from_file(cls, path: Path, *, version: str = "v7") -> MistralTokenizer:
        """Build offline from a tekken.json; `version` applies when the file lists no special tokens."""
        return cls._from_tekken(_load_tekken(Path(path), version), path)

    @classmethod
    def from_gguf_metadata(
        cls, meta: Mapping[str, Any], *, path: str | Path = "GGUF metadata"
    ) -> MistralTokenizer:
        """Tekken (V7) rebuilt from a GGUF whose `tokenizer.ggml.pre` is "tekken" (gguf_vocab)."""
        tekken = tekkenizer_from_gguf(meta, path)
        for key, name, token_id in (("tokenizer.ggml.bos_token_id", "<s>", tekken.bos_id),
                                    ("tokenizer.ggml.eos_token_id", "</s>", tekken.eos_id)):
            if key in meta and (type(meta[key]) is not int or meta[key] != token_id):
                raise ModelFileError(path, f"{key} is {meta[key]!r}, but {name} is token "
                                           f"{token_id}")
        return cls._from_tekken(tekken, path)

    @classmethod
    def _from_tekken(cls, tekken: Tekkenizer, path: str | Path) -> MistralTokenizer:
        """mistral-common's tokenizer with the instruct encoder of `tekken`'s version."""
        from mistral_common.protocol.instruct.normalize import get_normalizer
        from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
        from mistral_common.tokens.tokenizers.mistral import (
            MistralTokenizer as MistralCommonTokenizer,
        )

        encoders = _instruct_tokenizers()
        instruct = encoders.get(tekken.version)
        if instruct is None:
            supported = ", ".join(str(v.value) for v in encoders)
            raise ModelFileError(
                path, f"tokenizer version {tekken.version.value} unsupported ({supported})"
            )
        mistral = MistralCommonTokenizer(
            instruct(tekken),
            validator=get_validator(tekken.version, ValidationMode.test),
            request_normalizer=get_normalizer(tekken.version, tekken.model_settings_builder),
        )
        return cls(mistral)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of plain text (control-token text is encoded as ordinary text)."""
        return self._tekken.encode(text, bos=add_bos, eos=False)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of `ids`; with skip_special=False control tokens appear as "[INST]" etc."""
        policy = self._skip_special if skip_special else self._keep_special
        return self._tekken.decode([int(i) for i in ids], special_token_policy=policy)

    def token_text(self, token_id: int) -> str:
        """Display text of one token ("[INST]" for a control token)."""
        return self._tekken.id_to_piece(token_id)

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is one of the 1000 Tekken control ids."""
        return self._tekken.is_special(int(token_id))

    def max_token_chars(self) -> int | None:
        """The longest token's bytes (Tekken has no normalizer; a character is >= 1 byte)."""
        if self._max_token_chars is None:
            self._max_token_chars = max(len(self._tekken.id_to_byte_piece(i))
                                        for i in range(self.vocab_size))
        return self._max_token_chars


class HFTokenizer:
    """A HF `tokenizers` backend with the model's BOS/EOS ids."""

    def __init__(
        self,
        backend: HFBackend,
        *,
        bos_id: int | None,
        eos_ids: frozenset[int],
        should_add_bos: bool,
        named_fim_ids: Mapping[str, int] | None = None,
    ) -> None:
        self.backend = backend
        self.named_fim_ids = dict(named_fim_ids or {})  # a GGUF's FIM keys; see chat.fim
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.should_add_bos = should_add_bos
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        self._max_token_chars: int | None = 0  # 0: not computed yet
        self._plain: HFBackend | None = None  # a copy that never parses special tokens

    @classmethod
    def from_file(cls, tokenizer_json: Path, tokenizer_config: Path | None = None) -> HFTokenizer:
        """Load a tokenizer.json; BOS/EOS (and add_bos_token) come from tokenizer_config.json."""
        try:
            backend = HFBackend.from_file(str(tokenizer_json))
        except Exception as error:  # the Rust loader raises a bare Exception for bad files
            raise ModelFileError(tokenizer_json, f"not a valid tokenizer.json: {error}") from error
        config = _read_json(Path(tokenizer_config)) if tokenizer_config is not None else {}
        where = tokenizer_config if tokenizer_config is not None else tokenizer_json
        bos_id = _config_token_id(backend, config, "bos_token", where)
        eos_id = _config_token_id(backend, config, "eos_token", where)
        if "add_bos_token" in config:
            should_add_bos = bool(config["add_bos_token"])
        else:  # e.g. Llama 3: the post-processor adds BOS
            should_add_bos = bos_id is not None and backend.encode("").ids[:1] == [bos_id]
        eos_ids = frozenset() if eos_id is None else frozenset({eos_id})
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, should_add_bos=should_add_bos)

    @classmethod
    def from_gguf_metadata(
        cls, meta: Mapping[str, Any], *, path: str | Path = "GGUF metadata"
    ) -> HFTokenizer:
        """Byte-level BPE from a GGUF's `tokenizer.ggml.*` fields (errors name `path`).

        A Tekken vocabulary is refused: it is MistralTokenizer.from_gguf_metadata's.
        """
        pre = meta.get("tokenizer.ggml.pre")
        if pre == TEKKEN_PRE:
            raise ModelFileError(path, "a Tekken GGUF (tokenizer.ggml.pre 'tekken') is loaded "
                                       "with MistralTokenizer.from_gguf_metadata")
        backend = bpe_backend_from_gguf(meta, path)
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        stop_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        eos_ids = frozenset(int(meta[key]) for key in stop_keys if key in meta)
        # llama.cpp's default when the file does not say: BOS for Llama 3's vocabularies only
        add_bos = meta.get("tokenizer.ggml.add_bos_token", pre in ADDS_BOS_BY_DEFAULT)
        return cls(
            backend,
            bos_id=None if bos_id is None else int(bos_id),
            eos_ids=eos_ids,
            should_add_bos=bool(add_bos),
            named_fim_ids=fim_ids_from_gguf(meta, backend.get_vocab_size(), path),
        )

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; added special tokens in it ("<|im_start|>") match as one id.

        Long texts go through `encode_batch`, which releases the GIL (`encode` holds it: a
        1 MB prompt stalled every other thread, the server's event loop included, ~0.15 s)."""
        if len(text) > 4096:
            ids: list[int] = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token; call encode with add_bos=False")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of `ids`."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        """Display text of one token (decoded bytes, not the "Ġ" spelling)."""
        return self.backend.decode([int(token_id)], skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is an added special token."""
        return int(token_id) in self._special_ids

    @property
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of each added special token ("<|im_start|>" -> 1)."""
        decoder = self.backend.get_added_tokens_decoder()
        return {decoder[i].content: i for i in self._special_ids}

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` with special-token strings in it encoded as plain text (user
        content: "<|im_start|>" typed by a user must not open a turn)."""
        if self._plain is None:
            from tokenizers import Tokenizer as HFBackendClass

            plain = HFBackendClass.from_str(self.backend.to_str())
            plain.encode_special_tokens = True  # a copy: the flag is the backend's, not a call's
            self._plain = plain
        return list(self._plain.encode_batch([text], add_special_tokens=False)[0].ids)

    def max_token_chars(self) -> int | None:
        """The longest vocabulary entry as spelled in tokenizer.json: byte-level BPE spells
        each byte as one character, metaspace "▁" one space, byte fallback "<0xE4>" six, so
        no token decodes to more characters. None with a normalizer (NFC can shrink input)."""
        if self._max_token_chars == 0:
            self._max_token_chars = None if self.backend.normalizer is not None else max(
                len(piece) for piece in self.backend.get_vocab(with_added_tokens=True))
        return self._max_token_chars


def _config_token_id(
    backend: HFBackend, config: Mapping[str, Any], key: str, where: str | Path
) -> int | None:
    """The id of tokenizer_config's `key` token (a string or {"content": ...}), if named."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return None
    token_id = backend.token_to_id(str(value))
    if token_id is None:
        raise ModelFileError(where, f"{key} {value!r} is not in the tokenizer's vocabulary")
    return int(token_id)


class IncrementalDetokenizer:
    """Turns generated ids into text deltas, never splitting a UTF-8 character.

    Like vLLM's prefix_offset/read_offset: decode only a short window of recent ids. Text of
    `window[:read]` was already emitted; decode `window` whole, and emit what lies past the
    old text once it no longer ends in U+FFFD (a character still missing bytes). Example,
    "中" = bytes E4 B8 AD as three byte tokens: add(E4) -> "", add(B8) -> "", add(AD) -> "中".
    Each step decodes O(window) ids; the window restarts after every emission.
    """

    PROMPT_CONTEXT = 5  # prompt ids kept as left context (what vLLM uses)

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), *, skip_special: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        context = [int(i) for i in prompt_ids[-self.PROMPT_CONTEXT :]]
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # a prompt cut mid-character would skew the first delta
        self._window_ids = context
        self._read = len(context)  # window_ids[:read] are already emitted (or prompt)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def add(self, token_id: int) -> str:
        """Append one generated id; return the new complete text (may be "")."""
        self._window_ids.append(int(token_id))
        prefix_text = self._decode(self._window_ids[: self._read])
        text = self._decode(self._window_ids)
        if len(text) <= len(prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        del self._window_ids[: self._read]  # the emitted ids become the next window's context
        self._read = len(self._window_ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Text held back at the end of generation (e.g. a dangling partial character)."""
        prefix_text = self._decode(self._window_ids[: self._read])
        text = self._decode(self._window_ids)
        del self._window_ids[: self._read]
        self._read = len(self._window_ids)
        return text[len(prefix_text) :]
