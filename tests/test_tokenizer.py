"""Tokenizers against their reference libraries; streaming detokenization properties."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import gguf
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV7
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from levante.errors import ModelFileError
from levante.tokenizer import HFTokenizer, IncrementalDetokenizer, MistralTokenizer, Tokenizer

TEXTS = [
    "Hello, world! How are you doing today?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Pi is 3.14159, 1,000,000 > 999999; 2024-01-15T12:34:56Z and x2y 42nd",
    "héllo wörld — naïve café; 中文字符; 日本語テキスト; 한국어; emoji 🎉👍🏽 and 🇫🇷",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "<|endoftext|><repo_name>x<file_sep>y <|im_end|>",
    "   leading spaces\t\ttabs\n\n\nnewlines   trailing   ",
    "",
]
SLOW_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Plain-dict GGUF metadata (strings as str, arrays as lists), read with gguf-py."""
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_gguf: Path) -> dict[str, Any]:
    return read_gguf_metadata(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_meta: dict[str, Any], smollm2_gguf: Path) -> HFTokenizer:
    return HFTokenizer.from_gguf_metadata(smollm2_meta, path=smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf: Path) -> Any:
    """transformers' tokenizer loaded from the same GGUF (tokenizer only: fast)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def tekken(tekken_path: Path) -> MistralTokenizer:
    return MistralTokenizer.from_file(tekken_path)


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_gguf_ids_match_transformers(
    smollm2_tokenizer: HFTokenizer, smollm2_reference: Any, text: str
) -> None:
    expected = smollm2_reference.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.encode(text) == expected
    assert smollm2_tokenizer.decode(expected, skip_special=False) == smollm2_reference.decode(
        expected, skip_special_tokens=False
    )
    assert smollm2_tokenizer.decode(expected) == smollm2_reference.decode(
        expected, skip_special_tokens=True
    )


def _other_numeric(text: str) -> bool:
    """Numeric characters that are not decimal digits (superscripts, fractions, ...)."""
    return any(c.isnumeric() and not c.isdecimal() for c in text)


@SLOW_SETTINGS
@given(text=st.text(max_size=60))
def test_smollm2_gguf_ids_match_transformers_on_random_text(
    smollm2_tokenizer: HFTokenizer, smollm2_reference: Any, text: str
) -> None:
    assume(not _other_numeric(text))  # transformers' GGUF converter differs there: below
    assert smollm2_tokenizer.encode(text) == smollm2_reference.encode(
        text, add_special_tokens=False
    )


# llama.cpp's smollm pre-tokenizer splits every \p{N} character off, "²" and "½" included, so
# the space before one is a token of its own; transformers' GGUF converter keeps " ²" together
# ([3351, 127]). Ids printed by llama-cpp-python 0.3.36 (tokenize, no BOS) on the same file.
@pytest.mark.parametrize(("text", "llama_cpp_ids"), [(" ²", [216, 19133]),
                                                     ("x ²", [104, 216, 19133]),
                                                     (" ½ ", [216, 16738, 216])])
def test_smollm2_other_numerics_split_as_llama_cpp(smollm2_tokenizer: HFTokenizer, text: str,
                                                   llama_cpp_ids: list[int]) -> None:
    assert _other_numeric(text)
    assert smollm2_tokenizer.encode(text) == llama_cpp_ids


def test_smollm2_special_tokens(smollm2_tokenizer: HFTokenizer, smollm2_reference: Any) -> None:
    assert smollm2_tokenizer.vocab_size == len(smollm2_reference) == 49152
    assert smollm2_tokenizer.bos_id == smollm2_reference.bos_token_id == 1
    assert smollm2_tokenizer.eos_ids == {smollm2_reference.eos_token_id} == {2}
    assert not smollm2_tokenizer.should_add_bos
    assert smollm2_tokenizer.encode("<|im_start|>") == [1]
    assert smollm2_tokenizer.encode("hi", add_bos=True)[0] == 1
    assert smollm2_tokenizer.is_special(2) and not smollm2_tokenizer.is_special(33)
    assert smollm2_tokenizer.token_text(216) == " "
    assert smollm2_tokenizer.token_text(2) == "<|im_end|>"


def test_gguf_unsupported_tokenizer_is_a_clear_error(smollm2_meta: dict[str, Any]) -> None:
    with pytest.raises(ModelFileError, match="tokenizer.ggml.model 'llama'"):
        HFTokenizer.from_gguf_metadata(
            {**smollm2_meta, "tokenizer.ggml.model": "llama"}, path="x.gguf"
        )
    with pytest.raises(ModelFileError, match="tokenizer.ggml.pre 'qwen2'"):
        HFTokenizer.from_gguf_metadata({**smollm2_meta, "tokenizer.ggml.pre": "qwen2"})
    missing = {k: v for k, v in smollm2_meta.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(ModelFileError, match="x.gguf: GGUF metadata lacks 'tokenizer.ggml.merges'"):
        HFTokenizer.from_gguf_metadata(missing, path="x.gguf")


def test_hf_from_file_reads_bos_eos_from_config(
    smollm2_tokenizer: HFTokenizer, tmp_path: Path
) -> None:
    smollm2_tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = HFTokenizer.from_file(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    assert (loaded.bos_id, loaded.eos_ids, loaded.should_add_bos) == (1, {2}, False)
    assert all(loaded.encode(text) == smollm2_tokenizer.encode(text) for text in TEXTS)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ModelFileError, match="eos_token '<nope>' is not in the tokenizer"):
        HFTokenizer.from_file(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")


def test_tekken_v7_basics(tekken: MistralTokenizer) -> None:
    assert (tekken.vocab_size, tekken.bos_id, tekken.eos_ids) == (131072, 1, {2})
    assert isinstance(tekken.mistral.instruct_tokenizer, InstructTokenizerV7)
    assert tekken.encode("Hi", add_bos=True)[0] == 1
    assert tekken.token_text(3) == "[INST]" and tekken.is_special(3)
    assert not tekken.is_special(1000)
    assert tekken.decode([1, 3, *tekken.encode("x"), 4], skip_special=False) == "<s>[INST]x[/INST]"


@SLOW_SETTINGS
@given(text=st.text(max_size=200))
def test_tekken_round_trips_unicode(tekken: MistralTokenizer, text: str) -> None:
    ids = tekken.encode(text)
    assert all(i >= 1000 for i in ids)
    assert tekken.decode(ids) == text


def test_tekken_user_control_text_stays_plain(tekken: MistralTokenizer) -> None:
    text = "[INST] hi [/INST][TOOL_CALLS]"
    ids = tekken.encode(text)
    assert not any(tekken.is_special(i) for i in ids)
    assert tekken.decode(ids) == text


def write_tiny_tekken(path: Path, *, version: str, with_special_tokens: bool) -> None:
    """A 256-byte-token Tekken file, optionally listing its own special tokens."""
    vocab = [
        {"rank": b, "token_bytes": base64.b64encode(bytes([b])).decode(), "token_str": None}
        for b in range(256)
    ]
    config = {
        "pattern": r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|\s+|.",
        "num_vocab_tokens": 256,
        "default_vocab_size": 256 + 24,
        "default_num_special_tokens": 24,
        "version": version,
    }
    data: dict[str, Any] = {"config": config, "vocab": vocab}
    if with_special_tokens:
        data["special_tokens"] = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    path.write_text(json.dumps(data))


def test_tekken_file_with_own_special_tokens_keeps_its_version(tmp_path: Path) -> None:
    path = tmp_path / "tekken.json"
    write_tiny_tekken(path, version="v7", with_special_tokens=True)
    tokenizer = MistralTokenizer.from_file(path, version="v3")
    assert tokenizer.mistral.instruct_tokenizer.tokenizer.version.value == "v7"
    assert tokenizer.vocab_size == 280 and tokenizer.token_text(17) == "[SYSTEM_PROMPT]"
    assert tokenizer.encode("ab") == [24 + ord("a"), 24 + ord("b")]


def test_tekken_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tekken.json"
    write_tiny_tekken(path, version="v3", with_special_tokens=False)
    with pytest.raises(ModelFileError, match="unknown tokenizer version 'v99'"):
        MistralTokenizer.from_file(path, version="v99")
    path.write_text("{not json")
    with pytest.raises(ModelFileError, match="tekken.json: not valid JSON"):
        MistralTokenizer.from_file(path)


def stream(tokenizer: Tokenizer, ids: list[int], prompt_ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    return [detokenizer.add(i) for i in ids] + [detokenizer.flush()]


def check_stream(tokenizer: Tokenizer, ids: list[int], prompt_ids: list[int]) -> None:
    deltas = stream(tokenizer, ids, prompt_ids)
    full = tokenizer.decode(ids)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in delta for delta in deltas)


def piece_ids(
    draw: st.DrawFn, tokenizer: Tokenizer, byte_ids: dict[int, int], special_ids: list[int]
) -> list[int]:
    """One random piece: encoded text, a character as raw byte tokens, a special, or any id."""
    kind = draw(st.sampled_from(["text", "bytes", "special", "any"]))
    if kind == "text":
        return tokenizer.encode(draw(st.text(max_size=12)))
    if kind == "bytes":
        char = draw(st.sampled_from("é中文🎉👍🏽字한") | st.characters())
        return [byte_ids[b] for b in char.encode("utf-8", "surrogatepass") if b in byte_ids]
    if kind == "special":
        return [draw(st.sampled_from(special_ids))]
    return [draw(st.integers(0, tokenizer.vocab_size - 1))]


@st.composite
def token_sequences(
    draw: st.DrawFn, tokenizer: Tokenizer, byte_ids: dict[int, int], special_ids: list[int]
) -> list[int]:
    """Random ids made of several pieces (see `piece_ids`)."""
    pieces = draw(st.lists(st.just(None), max_size=12))
    return [i for _ in pieces for i in piece_ids(draw, tokenizer, byte_ids, special_ids)]


@SLOW_SETTINGS
@given(data=st.data())
def test_stream_equals_decode_tekken(tekken: MistralTokenizer, data: st.DataObject) -> None:
    byte_ids = {b: 1000 + b for b in range(256)}
    ids = data.draw(token_sequences(tekken, byte_ids, [1, 2, 3, 4, 9, 17]))
    prompt = data.draw(st.sampled_from([[], [1, 3, *tekken.encode("Hi 🎉"), 4]]))
    check_stream(tekken, ids, prompt)


@SLOW_SETTINGS
@given(data=st.data())
def test_stream_equals_decode_smollm2(smollm2_tokenizer: HFTokenizer, data: st.DataObject) -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    vocab = smollm2_tokenizer.backend.get_vocab()
    byte_ids = {b: vocab[spelling[b]] for b in range(256) if spelling[b] in vocab}  # 21 missing
    ids = data.draw(token_sequences(smollm2_tokenizer, byte_ids, [0, 1, 2, 5]))
    prompt = data.draw(
        st.sampled_from([[], smollm2_tokenizer.encode("<|im_start|>user\nhé 中<|im_end|>")])
    )
    check_stream(smollm2_tokenizer, ids, prompt)


def test_stream_holds_back_partial_characters(tekken: MistralTokenizer) -> None:
    ids = [1000 + b for b in "a🎉b".encode()]
    assert stream(tekken, ids, []) == ["a", "", "", "", "🎉", "b", ""]
    dangling = [1000 + b for b in "x🎉".encode()[:3]]
    assert stream(tekken, dangling, []) == ["x", "", "", "\ufffd"]


def test_stream_window_stays_small(tekken: MistralTokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tekken, tekken.encode("prompt " * 50))
    for token_id in tekken.encode("word " * 500):
        detokenizer.add(token_id)
        assert len(detokenizer._window_ids) <= 6


def test_long_texts_encode_as_short_ones(smollm2_tokenizer: HFTokenizer) -> None:
    """Texts past 4096 characters go through encode_batch (which releases the GIL): same ids."""
    text = "Héllo wörld, 12345 <|im_start|> tabs\t\tand   spaces 中文 🙂\n" * 200
    assert len(text) > 4096
    assert smollm2_tokenizer.encode(text) == smollm2_tokenizer.backend.encode(
        text, add_special_tokens=False).ids


def test_tekken_max_token_chars_bounds_every_token(tekken: MistralTokenizer) -> None:
    bound = tekken.max_token_chars()
    assert bound is not None
    assert max(len(tekken.decode([i], skip_special=False))
               for i in range(1000, tekken.vocab_size, 7)) <= bound
