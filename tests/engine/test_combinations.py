"""Every engine feature at once: each request gets what the plain engine gives it alone.

A seeded generator draws engine settings (prompt-lookup drafts, prefix caching, prefill chunk
size, a KV pool small enough to preempt, a sequence limit) and a mix of requests (shared
prefixes, n > 1, stop strings, a JSON-schema grammar, a LoRA adapter, greedy, seeded sampling
and penalties). SmolLM2 runs on its quantized blocks, whose numbers are batch-invariant on
CPU, so every request must match, token for token and finish reason, the plain engine
(no drafts, no cache, a roomy pool) running it by itself. A seed that once failed stays in
REGRESSIONS with what it caught.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from levante.bundle import Bundle, load
from levante.chat.grammars import GrammarCompiler
from levante.config import EngineConfig
from levante.engine.engine import Engine
from levante.engine.sampling_params import SamplingParams
from levante.quant import kernels
from levante.structured import Grammar

NUM_RANDOM_SEEDS = 24
REGRESSIONS: dict[int, str] = {}  # seed -> what it caught, once one fails

WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "the",
         "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "to", "see", "what", "was",
         "there", ".", ",", "!", "?")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def bundle(smollm2_gguf: Path) -> Bundle:
    if not kernels.available():
        pytest.skip("batch invariance on CPU comes from the compiled kernels")
    return load(str(smollm2_gguf))


@pytest.fixture(scope="module")
def adapters(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One random rank-4 LoRA on q_proj and v_proj, in PEFT's format, served as id 1."""
    from levante.finetune.adapters import attach_adapters

    folder = tmp_path_factory.mktemp("lora")
    config = bundle.config
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for layer in range(config.num_layers):
        for name, rows in (("q_proj", config.num_heads * config.head_dim),
                           ("v_proj", config.num_kv_heads * config.head_dim)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, config.dim, generator=generator) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, 4, generator=generator) * 0.05
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
         "lora_dropout": 0.0, "bias": "none", "task_type": None}))
    return attach_adapters(bundle.model, {"lora": folder})


@pytest.fixture(scope="module")
def grammar(bundle: Bundle) -> Grammar:
    compiled = GrammarCompiler(bundle.tokenizer).compile(
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
        chat_style="json")
    assert compiled is not None
    return compiled


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    grammar: Grammar | None
    adapter_id: int


def _draw_jobs(rng: random.Random, bundle: Bundle, grammar: Grammar) -> list[Job]:
    tokenizer = bundle.tokenizer
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))) for _ in range(2)]
    jobs = []
    for _ in range(rng.randint(3, 7)):
        text = rng.choice(prefixes) + " " + " ".join(rng.choice(WORDS)
                                                     for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.3:
            text = (text + " ") * 3  # repetitive: prompt lookup finds drafts
        prompt = tokenizer.encode(text, add_bos=tokenizer.should_add_bos)
        kind = rng.choice(("greedy", "greedy", "seeded", "penalized"))
        options: dict[str, Any] = {"max_tokens": rng.randint(3, 24),
                                   "ignore_eos": rng.random() < 0.7}
        if kind == "seeded":
            options.update(temperature=0.9, top_p=0.95, seed=rng.randint(0, 1000))
        elif kind == "penalized":
            options.update(temperature=0.0, frequency_penalty=0.7, presence_penalty=0.3)
        else:
            options.update(temperature=0.0)
        if rng.random() < 0.3:
            options["stop"] = (rng.choice(WORDS[:12]),)
        constrained = rng.random() < 0.2
        adapter_id = int(rng.random() < 0.3)
        for i in range(rng.choice((1, 1, 1, 2, 3))):  # n choices: seed + index, as the server
            seeded = options.get("seed")
            params = SamplingParams(**{**options, **({"seed": seeded + i} if seeded is not None
                                                     else {})})
            jobs.append(Job(prompt, params, grammar if constrained else None, adapter_id))
    return jobs


def _draw_config(rng: random.Random, jobs: list[Job]) -> EngineConfig:
    block_size = 16
    largest = max(-(-(len(j.prompt) + (j.params.max_tokens or 0)) // block_size) for j in jobs)
    return EngineConfig(
        max_model_len=512, block_size=block_size,
        num_kv_blocks=largest + rng.randint(0, 2 * largest),  # small enough to preempt
        num_speculative_tokens=rng.choice((0, 4)),
        speculative_max_batch=rng.choice((1, 4, 256)),
        enable_prefix_caching=rng.random() < 0.6,
        max_num_batched_tokens=rng.choice((16, 48, 512)),
        max_num_seqs=rng.choice((2, 4, 256)))


def _run(engine: Engine, jobs: list[Job]) -> list[tuple[list[int], str | None, str]]:
    ids = [engine.add_request(j.prompt, j.params, grammar=j.grammar, adapter_id=j.adapter_id)
           for j in jobs]
    outs = engine.run_to_completion(ids)
    assert engine.pool.num_free == engine.pool.num_blocks  # nothing leaked
    return [([t for o in outs[rid] for t in o.new_token_ids], outs[rid][-1].finish_reason,
             "".join(o.new_text for o in outs[rid])) for rid in ids]


@pytest.mark.parametrize("seed", [*REGRESSIONS, *range(NUM_RANDOM_SEEDS)])
def test_all_features_together_equal_each_request_alone(bundle: Bundle, adapters: Any,
                                                        grammar: Grammar, seed: int) -> None:
    rng = random.Random(seed)
    jobs = _draw_jobs(rng, bundle, grammar)
    config = _draw_config(rng, jobs)
    plain = Engine(bundle.model, bundle.tokenizer, EngineConfig(max_model_len=512),
                   adapters=adapters)
    expected = [_run(plain, [job])[0] for job in jobs]
    combined = Engine(bundle.model, bundle.tokenizer, config, adapters=adapters)
    got = _run(combined, jobs)
    for job, want, have in zip(jobs, expected, got):
        assert have == want, (f"seed {seed}, {config}: {job.params}, grammar "
                              f"{job.grammar is not None}, adapter {job.adapter_id}")
    assert combined.num_failed_requests == 0


def test_a_request_whose_sampling_fails_fails_alone(bundle: Bundle) -> None:
    """A grammar whose every allowed first token is a stop token id that min_tokens bans
    cannot be sampled: that request ends with an error naming min_tokens; its neighbour,
    sampled in the same batch, gets its tokens alone (seeded draws rewound before the retry)."""
    from levante.structured import fill_masks

    compiled = GrammarCompiler(bundle.tokenizer).compile(
        response_format={"type": "json_schema", "json_schema": {
            "name": "yes", "schema": {"type": "string", "enum": ["a"]}, "strict": True}},
        chat_style="json")
    assert compiled is not None
    first = fill_masks([compiled.matcher()], bundle.config.vocab_size)[0].nonzero().flatten()
    tokenizer = bundle.tokenizer
    prompt = tokenizer.encode("Say a:", add_bos=tokenizer.should_add_bos)
    doomed = SamplingParams(max_tokens=20, min_tokens=10, temperature=0.0,
                            stop_token_ids=tuple(first.tolist()))
    neighbour = SamplingParams(max_tokens=12, temperature=0.8, seed=11, ignore_eos=True)
    plain = Engine(bundle.model, bundle.tokenizer, EngineConfig(max_model_len=512))
    alone = _run(plain, [Job(prompt, neighbour, None, 0)])[0]
    engine = Engine(bundle.model, bundle.tokenizer, EngineConfig(max_model_len=512))
    bad = engine.add_request(prompt, doomed, grammar=compiled)
    good = engine.add_request(prompt, neighbour)
    outs = engine.run_to_completion([bad, good])
    assert outs[bad][-1].finish_reason == "error" and "min_tokens" in (outs[bad][-1].error or "")
    assert ([t for o in outs[good] for t in o.new_token_ids], outs[good][-1].finish_reason,
            "".join(o.new_text for o in outs[good])) == alone
    assert engine.num_failed_requests == 1
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_grammar_stopped_by_an_error_ends_its_request_with_error(
        bundle: Bundle, grammar: Grammar, monkeypatch: pytest.MonkeyPatch) -> None:
    """llguidance stops a matcher that hits a parser limit (is_stopped and is_error): that is
    an error, not a complete answer (it ended as "stop" with truncated JSON); the neighbour
    goes on."""
    from levante.structured import Matcher

    consumed: dict[int, int] = {}
    consume = Matcher.consume

    def counting(self: Matcher, token_id: int) -> None:
        consumed[id(self)] = consumed.get(id(self), 0) + 1
        consume(self, token_id)

    monkeypatch.setattr(Matcher, "consume", counting)
    monkeypatch.setattr(Matcher, "error", property(
        lambda self: "parser limit reached" if consumed.get(id(self), 0) >= 3 else None))
    tokenizer = bundle.tokenizer
    prompt = tokenizer.encode("A person as JSON:", add_bos=tokenizer.should_add_bos)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    plain = Engine(bundle.model, bundle.tokenizer, EngineConfig(max_model_len=512))
    alone = _run(plain, [Job(prompt, params, None, 0)])[0]
    engine = Engine(bundle.model, bundle.tokenizer, EngineConfig(max_model_len=512))
    bad = engine.add_request(prompt, params, grammar=grammar)
    good = engine.add_request(prompt, params)
    outs = engine.run_to_completion([bad, good])
    assert outs[bad][-1].finish_reason == "error"
    assert outs[bad][-1].error == "parser limit reached"
    assert sum(len(o.new_token_ids) for o in outs[bad]) == 3
    assert ([t for o in outs[good] for t in o.new_token_ids], outs[good][-1].finish_reason,
            "".join(o.new_text for o in outs[good])) == alone
