"""Tensor parallelism on CPU with gloo: shards equal slices of the full weights, TP logits and
greedy outputs equal one process's, each rank holds ~1/N of the weights, bad N refused."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from levante.bundle import Bundle, load
from levante.config import EngineConfig
from levante.distributed.launch import TensorParallelGroup, server_state
from levante.distributed.loading import load_shard, read_model_config, shard_reader
from levante.distributed.parallel import ShardSlice, shard_plan, weight_bytes
from levante.engine.engine import Engine
from levante.engine.sampling_params import SamplingParams
from levante.errors import ConfigError
from levante.load_config import LoadConfig

MAX_LEN = 256
# float32 KV: a 16-bit pool rounds K/V, and the ranks' sums (in another order) then round to
# neighbouring 16-bit values now and then; the split itself is what these tests check.
ENGINE = EngineConfig(max_model_len=MAX_LEN, num_kv_blocks=48, block_size=16,
                      kv_cache_dtype="float32")
# Mistral Small 3's shape (head_dim 128 > dim / heads, 4:1 GQA, rope 1e8, untied output) with
# 8 heads / 2 KV heads so TP 2 divides, and an odd vocabulary so the vocab split is uneven.
TINY_MISTRAL_8X2 = {"vocab_size": 32003, "hidden_size": 256, "intermediate_size": 512,
                    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                    "head_dim": 128, "rope_theta": 100_000_000.0, "rms_norm_eps": 1e-5,
                    "max_position_embeddings": 4096, "tie_word_embeddings": False,
                    "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2}
PROMPTS = [[1, 415, 5565, 302, 4843, 349], [1, 9873, 28725, 1526, 28808, 851, 349, 264, 1369]]


@pytest.fixture(scope="module")
def tiny_mistral_8x2(tmp_path_factory: pytest.TempPathFactory, tekken_path: Path) -> Path:
    """A random Mistral-shaped HF folder (transformers' MistralForCausalLM)."""
    from transformers import MistralConfig, MistralForCausalLM

    folder = tmp_path_factory.mktemp("tiny-mistral-8x2")
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(**TINY_MISTRAL_8X2)).save_pretrained(folder)
    shutil.copy(tekken_path, folder / "tekken.json")
    return folder


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf: Path) -> Bundle:
    """The float model: tensor-parallel ranks hold dequantized slices, not the GGUF blocks."""
    return load(str(smollm2_gguf), max_seq_len=MAX_LEN, quant="none")


def _prefill_logits(engine: Engine, prompts: list[list[int]]) -> torch.Tensor:
    """Logits of the last prompt token of each prompt, all prefilled in one batched step."""
    ids = [engine.add_request(p, SamplingParams(max_tokens=1)) for p in prompts]
    logits, rows = engine.runner.run(engine.scheduler.schedule())
    for request_id in ids:
        engine.abort(request_id)
    assert rows == list(range(len(prompts)))
    return logits


def _greedy(engine: Engine, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    outputs = engine.run_to_completion(ids)
    return [[t for out in outputs[i] for t in out.new_token_ids] for i in ids]


def _assert_matches(reference: Bundle, group: TensorParallelGroup,
                    prompts: list[list[int]]) -> None:
    single = Engine(reference.model, reference.tokenizer, ENGINE)
    parallel = group.engine(ENGINE)
    expected = _prefill_logits(single, prompts)
    got = _prefill_logits(parallel, prompts)
    assert got.shape == expected.shape == (len(prompts), reference.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert _greedy(parallel, prompts, 6) == _greedy(single, prompts, 6)


def _assert_weight_share(reference: Bundle, group: TensorParallelGroup) -> None:
    """Each rank holds 1/N of the weights, plus its own copy of the (tiny) norms."""
    n = group.spec.world_size
    total = weight_bytes(reference.model)
    norms = sum(p.numel() * p.element_size() for name, p in reference.model.named_parameters()
                if name.endswith("norm.weight"))
    assert len(group.weight_bytes) == n
    for rank_bytes in group.weight_bytes:
        assert abs(rank_bytes - total / n) <= norms + 4 * reference.config.dim * 4
    print(f"\nTP {n} weight bytes per rank: {group.weight_bytes} (one process: {total})")


def test_tensor_parallel_2_on_smollm2_is_refused_naming_the_heads(smollm2_gguf: Path) -> None:
    with pytest.raises(ConfigError, match=r"num_heads 9 and num_kv_heads 3.*possible: 1, 3"):
        TensorParallelGroup.start(str(smollm2_gguf), tensor_parallel=2)


def test_gguf_shards_are_slices_of_the_full_weights(smollm2_gguf: Path,
                                                    smollm2_reference: Bundle) -> None:
    fmt, config = read_model_config(smollm2_gguf, max_seq_len=MAX_LEN)
    reader = shard_reader(smollm2_gguf, fmt, config)
    full = smollm2_reference.model.state_dict()
    # The first and last layers and the global tensors: every kind of slice, a tenth the time.
    names = [n for n in full if not n.startswith("model.layers.")
             or n.startswith(("model.layers.0.", f"model.layers.{config.num_layers - 1}."))]
    plans = [{n: p for n, p in shard_plan(config, r, 3).items() if n in names} for r in range(3)]
    shards = [{n: reader.read(n, p, torch.float32) for n, p in plan.items()} for plan in plans]
    for name, part in plans[0].items():
        if part is None:
            assert all(torch.equal(s[name], full[name]) for s in shards), name
        else:
            assert torch.equal(torch.cat([s[name] for s in shards], part.dim), full[name]), name
    # Columns off block boundaries (Q4_1 blocks are 32 wide): partial blocks are trimmed.
    down = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(reader.read(down, ShardSlice(1, 5, 77), torch.float32),
                               full[down][:, 5:77], rtol=0, atol=0)


def _write_consolidated(hf_folder: Path, out: Path) -> Path:
    from safetensors.torch import load_file, save_file

    from levante.weights.layout import (
        CONSOLIDATED_GLOBAL_NAMES,
        CONSOLIDATED_LAYER_NAMES,
        half_to_interleaved,
    )

    c = TINY_MISTRAL_8X2
    to_mistral = {v: k for k, v in {**CONSOLIDATED_GLOBAL_NAMES,
                                    **CONSOLIDATED_LAYER_NAMES}.items()}
    tensors = {}
    for name, tensor in load_file(hf_folder / "model.safetensors").items():
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            heads = {"self_attn.q_proj.weight": c["num_attention_heads"],
                     "self_attn.k_proj.weight": c["num_key_value_heads"]}.get(rest)
            if heads:
                tensor = half_to_interleaved(tensor, heads)
            name = f"layers.{index}.{to_mistral[rest]}"
        else:
            name = to_mistral[name]
        tensors[name] = tensor.contiguous()
    out.mkdir()
    save_file(tensors, out / "consolidated.safetensors")
    (out / "params.json").write_text(json.dumps({
        "dim": c["hidden_size"], "n_layers": c["num_hidden_layers"], "head_dim": c["head_dim"],
        "hidden_dim": c["intermediate_size"], "n_heads": c["num_attention_heads"],
        "n_kv_heads": c["num_key_value_heads"], "rope_theta": c["rope_theta"],
        "norm_eps": c["rms_norm_eps"], "vocab_size": c["vocab_size"]}))
    shutil.copy(hf_folder / "tekken.json", out / "tekken.json")
    return out


def test_safetensors_shards_hf_and_consolidated(tiny_mistral_8x2: Path, tmp_path: Path) -> None:
    full = load(str(tiny_mistral_8x2)).model.state_dict()
    consolidated = _write_consolidated(tiny_mistral_8x2, tmp_path / "consolidated")
    for folder in (tiny_mistral_8x2, consolidated):
        fmt, config = read_model_config(folder)
        reader = shard_reader(folder, fmt, config)
        shards = [load_shard(reader, config, rank=r, world_size=2, dtype=torch.float32)
                  for r in range(2)]
        for name, part in shard_plan(config, 0, 2).items():
            merged = shards[0][name] if part is None else torch.cat(
                [s[name] for s in shards], part.dim)
            assert torch.equal(merged, full[name]), (fmt, name)


@contextlib.contextmanager
def _live_server(group: TensorParallelGroup, ref: str) -> Iterator[str]:
    import uvicorn

    from levante.server.app import create_app
    from levante.server.config import ServerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig(ref=ref, port=port, max_model_len=MAX_LEN, max_num_seqs=4,
                          num_kv_blocks=48, no_web=True)
    server = uvicorn.Server(uvicorn.Config(create_app(config, server_state(group, config)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


class TestSmolLM2TensorParallel3:
    """SmolLM2's 9 heads / 3 KV heads over 3 ranks (3 processes on this machine's 2 cores)."""

    @pytest.fixture(scope="class")
    @classmethod
    def group(cls, smollm2_gguf: Path) -> Iterator[TensorParallelGroup]:
        with TensorParallelGroup.start(str(smollm2_gguf), tensor_parallel=3,
                                       load_config=LoadConfig(max_model_len=MAX_LEN)) as group:
            yield group

    def test_logits_and_greedy_equal_one_process(self, group, smollm2_reference) -> None:
        _assert_matches(smollm2_reference, group, PROMPTS)

    def test_each_rank_holds_a_third_of_the_weights(self, group, smollm2_reference) -> None:
        _assert_weight_share(smollm2_reference, group)

    def test_openai_client_against_a_tp_server(self, group, smollm2_reference) -> None:
        from levante.llm import LLM

        messages = [{"role": "user", "content": "What is the capital of France?"}]
        expected = LLM(smollm2_reference, engine_config=ENGINE).chat(
            messages, SamplingParams(max_tokens=8, temperature=0.0)).text
        with _live_server(group, "smollm2") as base_url:
            client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
            whole = client.chat.completions.create(model="smollm2", messages=messages,
                                                   max_tokens=8, temperature=0)
            chunks = list(client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=8, temperature=0, stream=True))
        assert whole.choices[0].message.content == expected and "Paris" in expected
        assert whole.usage.completion_tokens == 8
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected

    def test_prompt_logprobs_over_ranks_equal_one_process(self, group, smollm2_reference) -> None:
        """Every rank computes the prompt positions' logits in step (the head's collectives)."""
        params = SamplingParams(max_tokens=0, prompt_logprobs=2)
        scores = []
        for engine in (group.engine(ENGINE), Engine(smollm2_reference.model,
                                                   smollm2_reference.tokenizer, ENGINE)):
            rid = engine.add_request(PROMPTS[0], params)
            scores.append(engine.run_to_completion([rid])[rid][-1].prompt_logprobs)
        ranked, alone = scores
        assert [t for t, _, _ in ranked] == [t for t, _, _ in alone] == PROMPTS[0][1:]
        assert [lp for _, lp, _ in ranked] == pytest.approx([lp for _, lp, _ in alone], abs=1e-3)


class TestTinyMistralTensorParallel2:
    """A Mistral-shaped HF safetensors model (8 heads / 2 KV heads) over 2 ranks."""

    @pytest.fixture(scope="class")
    @classmethod
    def group(cls, tiny_mistral_8x2: Path) -> Iterator[TensorParallelGroup]:
        with TensorParallelGroup.start(str(tiny_mistral_8x2), tensor_parallel=2,
                                       load_config=LoadConfig(max_model_len=MAX_LEN)) as group:
            yield group

    def test_logits_and_greedy_equal_one_process(self, group, tiny_mistral_8x2) -> None:
        reference = load(str(tiny_mistral_8x2), max_seq_len=MAX_LEN)
        _assert_matches(reference, group, PROMPTS)
        _assert_weight_share(reference, group)

    def test_a_dead_worker_fails_the_step_naming_its_rank(self, group) -> None:
        engine = group.engine(ENGINE)
        group.workers[0].kill()
        group.workers[0].join(10)
        request_id = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=2))
        [out] = engine.step()
        assert out.request_id == request_id and out.finish_reason == "error"
        assert "worker rank 1 exited" in (out.error or "")
