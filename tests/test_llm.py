"""The Python API on the real SmolLM2 GGUF, against transformers' own GGUF loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from levante import LLM, SamplingParams

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
]


@pytest.fixture(scope="module")
def llm(smollm2_gguf: Path) -> LLM:
    """The float path (the GGUF dequantized), whose numbers transformers can reproduce."""
    return LLM(str(smollm2_gguf), max_model_len=2048, quant="none")


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_greedy_chat_matches_transformers(index: int, llm: LLM, hf_smollm2) -> None:
    model, tokenizer = hf_smollm2
    messages = CONVERSATIONS[index]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        return_dict=False)
    assert llm.encode_chat(messages) == list(ids)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ours = llm.chat(messages, params).token_ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             min_new_tokens=32, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, len(ids):].tolist()


def test_generate_reports_speeds_and_text(llm: LLM) -> None:
    result = llm.generate("The sky is blue because", SamplingParams(max_tokens=8,
                                                                    temperature=0.0))[0]
    data = result.to_json()
    assert set(data) == {"prompt_token_ids", "token_ids", "text", "finish_reason",
                         "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert data["text"] == llm.tokenizer.decode(data["token_ids"])
    assert data["prefill_tokens_per_s"] > 0 and data["decode_tokens_per_s"] > 0


def test_batch_of_prompts_equals_each_alone(llm: LLM) -> None:
    prompts = ["Once upon a time", "def fibonacci(n):", "Paris is"]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    together = [c.token_ids for c in llm.generate(prompts, params)]
    assert together == [llm.generate(p, params)[0].token_ids for p in prompts]


def test_seed_reproducible_and_stop_strings(llm: LLM) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=3)
    a = llm.generate("Tell me a story:", params)[0]
    b = llm.generate("Tell me a story:", params)[0]
    assert a.token_ids == b.token_ids
    word = a.text.split()[1] if len(a.text.split()) > 1 else a.text.strip()[:2]
    c = llm.generate("Tell me a story:", params.replace(stop=(word,)))[0]
    assert c.finish_reason == "stop" and word not in c.text and a.text.startswith(c.text)


def test_chat_with_tools_and_schema(llm: LLM) -> None:
    import json

    import jsonschema

    tool = {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "required": ["a", "b"], "additionalProperties": False,
                       "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
    done = llm.chat([{"role": "user", "content": "What is 2 + 3?"}],
                    SamplingParams(max_tokens=40, temperature=0.0), tools=[tool],
                    tool_choice="required")
    assert done.finish_reason == "tool_calls" and done.tool_calls
    call = done.tool_calls[0]["function"]
    assert call["name"] == "add"
    jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])


def test_a_gguf_runs_from_its_blocks_by_default(smollm2_gguf: Path) -> None:
    from levante.quant.gguf_linear import BlockKernelLinear

    default = LLM(str(smollm2_gguf), max_model_len=256)
    assert isinstance(default.bundle.model.model.layers[0].self_attn.q_proj, BlockKernelLinear)
    done = default.generate("The capital of France is", SamplingParams(max_tokens=4,
                                                                       temperature=0.0))[0]
    assert "Paris" in done.text


@pytest.mark.parametrize("quant", ["gguf", "int8"])
def test_quantized_loads_answer(smollm2_gguf: Path, quant: str) -> None:
    """Kept in GGUF blocks, or requantized to int8: the answer survives the quantization."""
    small = LLM(str(smollm2_gguf), max_model_len=256, quant=quant)
    done = small.generate("The capital of France is", SamplingParams(max_tokens=4,
                                                                     temperature=0.0))[0]
    assert "Paris" in done.text
