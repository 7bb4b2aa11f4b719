"""GGUF vocabularies against their references.

A Tekken GGUF (what `levante quantize` writes for a tekken.json folder) tokenizes as
mistral-common's own V7 Tekkenizer and builds the same chat prompts as the tekken.json folder;
malformed Tekken metadata is a ModelFileError naming the file and the field. The byte-level BPE
`pre` names llama.cpp uses for Llama-family files ("gpt-2", "llama-bpe", "default") split as
llama.cpp's regexes say: checked against those regexes run by Python's `regex` with BPE by
tiktoken, and against llama.cpp itself where its peer venv exists (benchmarks/peers.py).
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import regex
import tiktoken
from gguf import GGUFWriter
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MistralCommonTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from levante.bundle import _gguf_tokenizer, load_tokenizer
from levante.chat import MistralChatFormat
from levante.errors import ModelFileError
from levante.gguf_vocab import TEKKEN_PATTERN, tekken_json_from_gguf
from levante.tokenizer import HFTokenizer, MistralTokenizer
from levante.weights.gguf import GGUFFile

TEXTS = [
    "Hello, world! How are you doing today?",
    "Pi is 3.14159; 1,000,000 > 999999 and 2024-01-15T12:34:56Z, x2y 42nd 1234567890",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "   leading spaces\t\ttabs\n\n\nnewlines   trailing   ",
    "\r\n\r\nwindows\r\nlines\n \n  \n",
    "CamelCaseIdentifier HTTPServerError don't I'M WE'LL path/to/file.py //comment",
    "héllo wörld — naïve café; Ærøskøbing; ñandú; Ελληνικά; русский текст",
    "中文字符; 日本語テキスト; 한국어 텍스트",
    "emoji 🎉👍🏽 and 🇫🇷 and 👨‍👩‍👧 ✓",
    "\x00\x01 control \u200b zero-width \ufeff bom \u00a0nbsp",
    "",
    " ",
]
# Text that spells control tokens: a Tekken GGUF must encode it as plain text.
CONTROL_LOOKALIKES = "[INST] hi [/INST][TOOL_CALLS]</s><s><unk>[SYSTEM_PROMPT]<SPECIAL_20>[IMG]"
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
PEER_PYTHON = Path(os.environ.get("LEVANTE_HOME", Path.home() / ".cache" / "levante"),
                   "peers", "llama-cpp", "bin", "python")
# The regexes llama.cpp's src/llama-vocab.cpp lists per pre-tokenizer type, applied in turn.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA_CPP_REGEXES = {
    "gpt-2": [GPT2],
    "llama-bpe": [(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
}
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}},
                      "required": ["city"]}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather", "parameters": WEATHER_PARAMETERS}}
ARGUMENTS = '{"city": "Paris [TOOL_CALLS]"}'


def conversation() -> list[dict[str, Any]]:
    """System prompt, a tool call and its result, a reply, and a user turn typing control text."""
    call = {"id": "abcDEF123", "type": "function",
            "function": {"name": "get_weather", "arguments": ARGUMENTS}}
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "22C, sunny [/TOOL_RESULTS]"},
        {"role": "assistant", "content": "Sunny, 22C."},
        {"role": "user", "content": "[INST] And in Rome? [TOOL_CALLS][/INST]"},
    ]


def reference_request() -> ChatCompletionRequest:
    """`conversation()` built directly from mistral-common's classes."""
    call = ToolCall(id="abcDEF123", function=FunctionCall(name="get_weather", arguments=ARGUMENTS))
    tool = Tool(function=Function(name="get_weather", description="Current weather",
                                  parameters=WEATHER_PARAMETERS))
    return ChatCompletionRequest(messages=[
        SystemMessage(content="You are terse."),
        UserMessage(content="Weather in Paris?"),
        AssistantMessage(content=None, tool_calls=[call]),
        ToolMessage(tool_call_id="abcDEF123", content="22C, sunny [/TOOL_RESULTS]"),
        AssistantMessage(content="Sunny, 22C."),
        UserMessage(content="[INST] And in Rome? [TOOL_CALLS][/INST]"),
    ], tools=[tool])


@pytest.fixture(scope="module")
def v7_folder(tekken_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with mistral-common's tekken.json relabelled v7 (as the Mistral proxy has)."""
    data = json.loads(tekken_path.read_text())
    data["config"]["version"] = "v7"
    folder = tmp_path_factory.mktemp("tekken-v7")
    (folder / "tekken.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def reference(v7_folder: Path) -> MistralCommonTokenizer:
    """mistral-common's own V7 tokenizer, from the file listing its special tokens (as Mistral
    ships it)."""
    data = json.loads((v7_folder / "tekken.json").read_text())
    data["special_tokens"] = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    path = v7_folder.parent / "reference-tekken.json"
    path.write_text(json.dumps(data))
    return MistralCommonTokenizer.from_file(path)


def write_gguf(path: Path, meta: dict[str, Any]) -> Path:
    """A tensor-less llama GGUF holding `meta`'s tokenizer fields (what llama.cpp's vocab-only
    load reads), written by gguf-py."""
    writer = GGUFWriter(path, arch="llama")
    for add, value in ((writer.add_context_length, 64), (writer.add_embedding_length, 32),
                       (writer.add_block_count, 1), (writer.add_feed_forward_length, 64),
                       (writer.add_head_count, 4), (writer.add_head_count_kv, 4),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_rope_freq_base, 1e4)):
        add(value)
    writers: dict[str, Callable[[Any], None]] = {
        "tokenizer.ggml.model": writer.add_tokenizer_model,
        "tokenizer.ggml.pre": writer.add_tokenizer_pre,
        "tokenizer.ggml.tokens": writer.add_token_list,
        "tokenizer.ggml.token_type": writer.add_token_types,
        "tokenizer.ggml.merges": writer.add_token_merges,
        "tokenizer.ggml.bos_token_id": writer.add_bos_token_id,
        "tokenizer.ggml.eos_token_id": writer.add_eos_token_id,
        "tokenizer.ggml.add_bos_token": writer.add_add_bos_token,
        "tokenizer.chat_template": writer.add_chat_template,
    }
    for key, value in meta.items():
        if key in writers:
            writers[key](value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tekken_gguf(v7_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tokenizer metadata `levante quantize` writes for the v7 folder, plus a ChatML template
    (which a Tekken GGUF must not use)."""
    from levante.quant.export import _add_tekken

    path = tmp_path_factory.mktemp("tekken-gguf") / "tekken.gguf"
    writer = GGUFWriter(path, arch="llama")
    _add_tekken(writer, v7_folder)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tekken_meta(tekken_gguf: Path) -> dict[str, Any]:
    return GGUFFile(tekken_gguf).metadata


@pytest.fixture(scope="module")
def gguf_tekken(tekken_meta: dict[str, Any], tekken_gguf: Path) -> MistralTokenizer:
    return MistralTokenizer.from_gguf_metadata(tekken_meta, path=tekken_gguf)


def test_tekken_pattern_is_mistral_commons(tekken_path: Path) -> None:
    for path in sorted(tekken_path.parent.glob("tekken_*.json")):
        assert json.loads(path.read_text())["config"]["pattern"] == TEKKEN_PATTERN, path.name


@pytest.mark.parametrize("text", [*TEXTS, CONTROL_LOOKALIKES])
def test_tekken_gguf_ids_match_mistral_common(
    gguf_tekken: MistralTokenizer, reference: MistralCommonTokenizer, text: str
) -> None:
    tekken = reference.instruct_tokenizer.tokenizer
    ids = gguf_tekken.encode(text)
    assert ids == tekken.encode(text, bos=False, eos=False)
    assert gguf_tekken.encode(text, add_bos=True) == tekken.encode(text, bos=True, eos=False)
    assert not any(gguf_tekken.is_special(i) for i in ids)
    assert gguf_tekken.decode(ids) == text
    with_controls = [1, 3, *ids, 4, 9, 2]
    assert gguf_tekken.decode(with_controls, skip_special=False) == tekken.decode(
        with_controls, special_token_policy=SpecialTokenPolicy.KEEP)


@SETTINGS
@given(text=st.text(max_size=200))
def test_tekken_gguf_ids_match_mistral_common_on_random_text(
    gguf_tekken: MistralTokenizer, reference: MistralCommonTokenizer, text: str
) -> None:
    ids = gguf_tekken.encode(text)
    assert ids == reference.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)
    assert gguf_tekken.decode(ids) == text


def test_tekken_gguf_vocabulary_equals_mistral_common(
    gguf_tekken: MistralTokenizer, reference: MistralCommonTokenizer
) -> None:
    ours = gguf_tekken.mistral.instruct_tokenizer.tokenizer
    theirs = reference.instruct_tokenizer.tokenizer
    assert (gguf_tekken.vocab_size, gguf_tekken.bos_id, gguf_tekken.eos_ids) == (131072, 1, {2})
    assert gguf_tekken.should_add_bos
    assert (ours.num_special_tokens, ours.version) == (theirs.num_special_tokens, theirs.version)
    keep = SpecialTokenPolicy.KEEP
    assert [ours.id_to_byte_piece(i, keep) for i in range(ours.n_words)] == [
        theirs.id_to_byte_piece(i, keep) for i in range(theirs.n_words)]
    assert gguf_tekken.token_text(9) == "[TOOL_CALLS]" and gguf_tekken.is_special(999)
    assert not gguf_tekken.is_special(1000)


def test_tekken_gguf_chat_is_mistral_v7(
    tekken_gguf: Path, tekken_meta: dict[str, Any], v7_folder: Path,
    reference: MistralCommonTokenizer,
) -> None:
    tokenizer, chat = _gguf_tokenizer(tekken_gguf, tekken_meta)
    assert isinstance(tokenizer, MistralTokenizer) and isinstance(chat, MistralChatFormat)
    _, folder_chat = load_tokenizer(v7_folder)
    assert isinstance(folder_chat, MistralChatFormat)
    ids = chat.encode(conversation(), tools=[WEATHER_TOOL])
    assert ids == folder_chat.encode(conversation(), tools=[WEATHER_TOOL])
    assert ids == reference.encode_chat_completion(reference_request()).tokens
    assert ids.count(9) == 1 and ids.count(3) == 2  # only the real call; typed text stays text
    assert tokenizer.decode(ids, skip_special=False).startswith(
        "<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]Weather in Paris?[/INST]"
        '[TOOL_CALLS][{"name": "get_weather"')
    finished = [*conversation(), {"role": "assistant", "content": "Cloudy."}]
    assert chat.encode(finished, add_generation_prompt=False) == folder_chat.encode(
        finished, add_generation_prompt=False)


def test_tekken_json_from_gguf_is_mistral_commons_file(
    tekken_gguf: Path, tekken_meta: dict[str, Any], reference: MistralCommonTokenizer,
    tmp_path: Path,
) -> None:
    """What `levante quantize` writes for a Tekken GGUF's tokenizer (GGUF -> int8 folder)."""
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(tekken_json_from_gguf(tekken_meta, tekken_gguf)))
    rebuilt = MistralCommonTokenizer.from_file(path)
    assert rebuilt.instruct_tokenizer.tokenizer.version == TokenizerVersion.v7
    assert rebuilt.encode_chat_completion(reference_request()).tokens == (
        reference.encode_chat_completion(reference_request()).tokens)
    for text in [*TEXTS, CONTROL_LOOKALIKES]:
        assert rebuilt.instruct_tokenizer.tokenizer.encode(text, bos=True, eos=False) == (
            reference.instruct_tokenizer.tokenizer.encode(text, bos=True, eos=False))


@pytest.mark.slow
def test_quantized_tekken_gguf_loads_as_mistral(
    tiny_mistral_hf: Path, reference: MistralCommonTokenizer, tmp_path: Path
) -> None:
    """A tekken.json folder -> `levante quantize` q8_0 GGUF -> bundle.load -> int8 folder: one
    tokenizer and one V7 chat format all the way."""
    from levante.bundle import load
    from levante.quant.export import quantize_checkpoint

    gguf_path = tmp_path / "tiny-q8_0.gguf"
    quantize_checkpoint(tiny_mistral_hf, to="q8_0", out=gguf_path, progress=False)
    expected = reference.encode_chat_completion(reference_request()).tokens
    bundle = load(str(gguf_path), max_seq_len=512, quant="none")
    assert isinstance(bundle.tokenizer, MistralTokenizer)
    assert isinstance(bundle.chat_format, MistralChatFormat)
    assert bundle.chat_format.encode(conversation(), tools=[WEATHER_TOOL]) == expected
    int8 = quantize_checkpoint(gguf_path, to="int8", out=tmp_path / "int8", progress=False).path
    _, chat = load_tokenizer(int8)
    assert isinstance(chat, MistralChatFormat)
    assert chat.encode(conversation(), tools=[WEATHER_TOOL]) == expected


def test_hf_tokenizer_refuses_tekken(tekken_meta: dict[str, Any]) -> None:
    with pytest.raises(ModelFileError, match="x.gguf: a Tekken GGUF .* MistralTokenizer"):
        HFTokenizer.from_gguf_metadata(tekken_meta, path="x.gguf")


def _edit(key: str, change: Callable[[Any], Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda meta: {**meta, key: change(meta[key])}


def _replace(items: list[Any], index: int, value: Any) -> list[Any]:
    return [*items[:index], value, *items[index + 1:]]


TOKENS, TYPES = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"
BAD_TEKKEN = {
    "no tokens": (lambda meta: {k: v for k, v in meta.items() if k != TOKENS},
                  "lacks 'tokenizer.ggml.tokens'"),
    "tokens not strings": (_edit(TOKENS, lambda t: list(range(len(t)))),
                           "tokenizer.ggml.tokens must be an array of strings"),
    "types too short": (_edit(TYPES, lambda t: t[:-1]), "token_type has 131071 entries for 131072"),
    "types not integers": (_edit(TYPES, lambda t: [str(x) for x in t]),
                           "token_type must be an array of integers"),
    "control after normal": (_edit(TYPES, lambda t: _replace(t, 5000, 3)),
                             "token_type: .* token 5000 has type 3"),
    "no control tokens": (_edit(TYPES, lambda t: [1] * len(t)), "token 0 has type 1"),
    "not byte-level": (_edit(TOKENS, lambda t: _replace(t, 1500, "中")),
                       "tokens: token 1500 '中' is not a byte-level string"),
    "bytes out of order": (_edit(TOKENS, lambda t: [*t[:1000], t[1001], t[1000], *t[1002:]]),
                           r"tokens: token 1000 must be the byte 0x00 .* got b'\\x01'"),
    "repeated bytes": (_edit(TOKENS, lambda t: _replace(t, 2000, t[1999])),
                       "tokens: token 2000 must be a new, non-empty byte string"),
    "too few byte tokens": (lambda meta: {**meta, TOKENS: meta[TOKENS][:1100],
                                          TYPES: meta[TYPES][:1100]},
                            "needs all 256 byte tokens after its 1000 control tokens, got 100"),
    "missing control": (_edit(TOKENS, lambda t: _replace(t, 3, "[FOO]")),
                        r"tokens: a Tekken \(V7\) vocabulary needs control tokens \[INST\]"),
    "repeated control": (_edit(TOKENS, lambda t: _replace(t, 21, t[20])),
                         r"control token names must be unique .*<SPECIAL_20>"),
    "newer than V7": (_edit(TOKENS, lambda t: [*t[:20], "[ARGS]", "[CALL_ID]", *t[22:]]),
                      r"control tokens \[ARGS\], \[CALL_ID\] belong to a Tekken tokenizer newer"),
    "wrong BOS id": (_edit("tokenizer.ggml.bos_token_id", lambda _: 5),
                     "tokenizer.ggml.bos_token_id is 5, but <s> is token 1"),
}


@pytest.mark.parametrize("case", list(BAD_TEKKEN))
def test_malformed_tekken_metadata_is_a_clear_error(
    tekken_meta: dict[str, Any], case: str
) -> None:
    edit, message = BAD_TEKKEN[case]
    with pytest.raises(ModelFileError, match=f"bad.gguf: .*{message}"):
        _gguf_tokenizer(Path("bad.gguf"), edit(tekken_meta))


def test_unsupported_pre_lists_the_supported_ones(tekken_meta: dict[str, Any]) -> None:
    meta = {**tekken_meta, "tokenizer.ggml.pre": "qwen2"}
    supported = "default, gpt-2, gpt2, llama-bpe, llama-v3, llama3, smollm, tekken"
    with pytest.raises(ModelFileError, match=f"tokenizer.ggml.pre 'qwen2' is not supported "
                                             f"\\({supported}\\)"):
        _gguf_tokenizer(Path("q.gguf"), meta)


@pytest.fixture(scope="module")
def tekken_bpe(tekken_path: Path) -> tiktoken.Encoding:
    """BPE by Tekken's ranks, straight from mistral-common's file (the first 130072 are used)."""
    vocab = json.loads(tekken_path.read_text())["vocab"][:131072 - 1000]
    ranks = {base64.b64decode(token["token_bytes"]): token["rank"] for token in vocab}
    return tiktoken.Encoding("tekken-ranks", pat_str=r"[\s\S]+", mergeable_ranks=ranks,
                             special_tokens={})


@pytest.fixture(scope="module")
def bpe_tokenizers(tekken_meta: dict[str, Any]) -> dict[str, HFTokenizer]:
    """The Tekken vocabulary read as each byte-level BPE `pre` (~2 s each)."""
    return {pre: HFTokenizer.from_gguf_metadata({**tekken_meta, "tokenizer.ggml.pre": pre})
            for pre in LLAMA_CPP_REGEXES}


def reference_bpe_ids(text: str, pre: str, tekken_bpe: tiktoken.Encoding) -> list[int]:
    """llama.cpp's regexes for `pre` in turn (each splits every piece; matches and the text
    between become pieces), then BPE by rank (tiktoken) on each piece's UTF-8 bytes."""
    pieces = [text]
    for pattern in LLAMA_CPP_REGEXES[pre]:
        split = []
        for piece in pieces:
            start = 0
            for match in regex.finditer(pattern, piece):
                split += [piece[start:match.start()], match.group()]
                start = match.end()
            split.append(piece[start:])
        pieces = [p for p in split if p]
    return [1000 + i for p in pieces for i in tekken_bpe._encode_single_piece(p.encode())]


@pytest.mark.parametrize("pre", list(LLAMA_CPP_REGEXES))
@pytest.mark.parametrize("text", TEXTS)
def test_bpe_pre_tokenizers_match_llama_cpp_regexes(
    bpe_tokenizers: dict[str, HFTokenizer], tekken_bpe: tiktoken.Encoding, pre: str, text: str
) -> None:
    tokenizer = bpe_tokenizers[pre]
    ids = tokenizer.encode(text)
    assert ids == reference_bpe_ids(text, pre, tekken_bpe)
    assert tokenizer.decode(ids) == text


@SETTINGS
@given(data=st.data())
def test_bpe_pre_tokenizers_match_llama_cpp_regexes_on_random_text(
    bpe_tokenizers: dict[str, HFTokenizer], tekken_bpe: tiktoken.Encoding, data: st.DataObject
) -> None:
    # assigned characters only: the engines' Unicode tables differ in version
    text = data.draw(st.text(st.characters(exclude_categories=("Cs", "Co", "Cn")), max_size=80))
    assume("<" not in text and "[" not in text)  # "<s>", "[INST]" are added tokens here
    pre = data.draw(st.sampled_from(list(LLAMA_CPP_REGEXES)))
    assert bpe_tokenizers[pre].encode(text) == reference_bpe_ids(text, pre, tekken_bpe)


def test_bpe_pre_defaults_follow_llama_cpp(bpe_tokenizers: dict[str, HFTokenizer],
                                           tekken_meta: dict[str, Any]) -> None:
    """Without `tokenizer.ggml.add_bos_token`, llama.cpp adds BOS for llama-bpe only."""
    meta = {k: v for k, v in tekken_meta.items() if k != "tokenizer.ggml.add_bos_token"}
    adds_bos = {pre: HFTokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": pre})
                .should_add_bos for pre in ("llama-bpe", "default", "gpt-2")}
    assert adds_bos == {"llama-bpe": True, "default": False, "gpt-2": False}
    assert bpe_tokenizers["default"].should_add_bos  # the file says so


def random_texts(count: int) -> list[str]:
    """Seeded random strings mixing ASCII, whitespace, Latin/Greek/Cyrillic.., CJK and emoji
    (no "<" or "[": the byte-level BPE names match control tokens such as "<s>" in text)."""
    pools = [" \n\t\r", "".join(chr(c) for c in range(32, 127) if chr(c) not in "<["),
             "".join(chr(c) for c in range(0xA0, 0x3000) if unicodedata.category(chr(c))[0] != "C"),
             "".join(chr(c) for c in range(0x4E00, 0x4F00)),
             "".join(chr(c) for c in range(0x1F300, 0x1FB00)
                     if unicodedata.category(chr(c)) != "Cn")]
    rng = random.Random(0)
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 40)))
            for _ in range(count)]


LLAMA_CPP_TOKENIZE = """
import json, sys
from llama_cpp import Llama
jobs = json.load(sys.stdin)
out = {}
for path, texts in jobs.items():
    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    out[path] = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]
print(json.dumps(out))
"""


@pytest.mark.skipif(not PEER_PYTHON.exists(), reason="no llama-cpp-python peer venv")
def test_gguf_pre_tokenizers_match_llama_cpp(
    tekken_meta: dict[str, Any], gguf_tekken: MistralTokenizer,
    bpe_tokenizers: dict[str, HFTokenizer], tmp_path: Path,
) -> None:
    """llama.cpp itself reading the same vocabulary under each `pre` name."""
    ours: dict[str, Any] = {"tekken": gguf_tekken, **bpe_tokenizers}
    texts = [*TEXTS, *random_texts(200)]
    files = {pre: str(write_gguf(tmp_path / f"{pre}.gguf", {**tekken_meta,
                                                              "tokenizer.ggml.pre": pre}))
             for pre in ours}
    result = subprocess.run([str(PEER_PYTHON), "-c", LLAMA_CPP_TOKENIZE],
                            input=json.dumps({path: texts for path in files.values()}),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = json.loads(result.stdout.strip().splitlines()[-1])
    for pre, path in files.items():
        assert [ours[pre].encode(t) for t in texts] == expected[path], pre
