"""Fill-in-the-middle prompts equal the references: mistral-common's `encode_fim` for Tekken,
llama.cpp's /infill order ([BOS] FIM_PRE prefix FIM_SUF suffix FIM_MID) for a GGUF's FIM ids or
its FIM tokens found by text; a model without FIM is a 400 naming `suffix` and the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from levante.chat.fim import fim_prompt_ids, fim_token_ids, supports_fim
from levante.errors import ModelFileError, RequestError
from levante.tokenizer import HFTokenizer, MistralTokenizer

PREFIX = "def add(a, b):\n    <fim_middle>[SUFFIX] "  # FIM-token text in code stays text
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_gguf: Path) -> dict[str, Any]:
    from levante.weights.gguf import GGUFFile

    return dict(GGUFFile(smollm2_gguf).metadata)


def test_tekken_prompt_is_mistral_commons_encode_fim(tekken_path: Path) -> None:
    from mistral_common.protocol.fim.request import FIMRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as Reference

    tokenizer = MistralTokenizer.from_file(tekken_path)
    reference = Reference.from_file(str(tekken_path))  # mistral-common's own loader
    expected = reference.encode_fim(FIMRequest(prompt=PREFIX, suffix=SUFFIX)).tokens
    ids = fim_prompt_ids(tokenizer, PREFIX, SUFFIX, model="m")
    assert ids == expected and supports_fim(tokenizer)
    tekken = tokenizer.mistral.instruct_tokenizer.tokenizer
    suffix_id, prefix_id = (tekken.get_special_token(t) for t in ("[SUFFIX]", "[PREFIX]"))
    assert ids[:2] == [tekken.bos_id, suffix_id] and ids.count(prefix_id) == 1
    assert ids[ids.index(prefix_id) + 1:] == tokenizer.encode(PREFIX)  # prefix last, as text


def test_tekken_version_without_fim_is_a_400(tekken_path: Path) -> None:
    from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV1
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as Common

    tekken = MistralTokenizer.from_file(tekken_path).mistral.instruct_tokenizer.tokenizer
    v1 = MistralTokenizer(Common(InstructTokenizerV1(tekken), validator=None,  # type: ignore[arg-type]
                                 request_normalizer=None))  # type: ignore[arg-type]
    assert not supports_fim(v1)
    with pytest.raises(RequestError, match="'old-model' does not support suffix") as info:
        fim_prompt_ids(v1, "a", "b", model="old-model")
    assert info.value.param == "suffix"


def test_gguf_fim_keys_give_llama_cpps_order(smollm2_meta: dict[str, Any]) -> None:
    meta = {**smollm2_meta, "tokenizer.ggml.fim_pre_token_id": 3,
            "tokenizer.ggml.suffix_token_id": 4,  # the older key name is read too
            "tokenizer.ggml.fim_mid_token_id": 5, "tokenizer.ggml.add_bos_token": True}
    tokenizer = HFTokenizer.from_gguf_metadata(meta)
    assert fim_token_ids(tokenizer) == (3, 4, 5)
    ids = fim_prompt_ids(tokenizer, PREFIX, SUFFIX, model="m")
    plain = HFTokenizer.from_gguf_metadata(smollm2_meta)
    assert ids == [1, 3, *plain.encode_text(PREFIX), 4, *plain.encode_text(SUFFIX), 5]
    assert plain.decode(ids[2:-1], skip_special=False) == PREFIX + "<reponame>" + SUFFIX


def test_fim_tokens_found_by_text_as_llama_cpp_does(smollm2_meta: dict[str, Any]) -> None:
    tokens = list(smollm2_meta["tokenizer.ggml.tokens"])
    tokens[3:6] = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>"]  # StarCoder's spelling
    tokenizer = HFTokenizer.from_gguf_metadata({**smollm2_meta, "tokenizer.ggml.tokens": tokens})
    assert fim_token_ids(tokenizer) == (3, 5, 4) and supports_fim(tokenizer)
    ids = fim_prompt_ids(tokenizer, PREFIX, SUFFIX, model="m")
    assert ids[0] == 3 and ids[-1] == 4 and ids.count(5) == 1 and ids.count(4) == 1  # add_bos off
    assert tokenizer.decode(ids[1:ids.index(5)]) == PREFIX  # "<fim_middle>" typed: plain text


def test_model_without_fim_is_a_400_naming_suffix(smollm2_meta: dict[str, Any]) -> None:
    tokenizer = HFTokenizer.from_gguf_metadata(smollm2_meta)  # SmolLM2: no FIM tokens
    assert fim_token_ids(tokenizer) is None and not supports_fim(tokenizer)
    with pytest.raises(RequestError, match="'smollm2' does not support suffix") as info:
        fim_prompt_ids(tokenizer, "a", "b", model="smollm2")
    assert info.value.param == "suffix" and info.value.status_code == 400


@pytest.mark.parametrize("value", [49152, -1, "3", 2.0])
def test_bad_fim_key_is_a_model_file_error(smollm2_meta: dict[str, Any], value: Any) -> None:
    meta = {**smollm2_meta, "tokenizer.ggml.fim_mid_token_id": value}
    with pytest.raises(ModelFileError, match="fim_mid_token_id"):
        HFTokenizer.from_gguf_metadata(meta, path="x.gguf")
