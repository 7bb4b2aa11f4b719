"""Cost of JSON-schema-constrained decoding on SmolLM2: tokens/s with and without the grammar,
and llguidance's mask time per step, at batch 1 and 8; time to first token with 1, 16 and 128
tools (tool_choice "required"), first request and cached repeat.

Usage: .venv/bin/python benchmarks/structured.py [--ref smollm2] [--tokens 64] [--rounds 3]
       [--tools-only]

Time to first token with tools is validation + grammar compile + the first constrained step
on a fixed short prompt: the prompt text describing the tools is left out, as 128 tools
(~10k tokens in the json style) do not fit SmolLM2's context and their prefill is no grammar
cost. The repeat finds the grammar in the compiler's cache.

The schema (an array of at least 50 people) cannot finish within --tokens, so constrained and
free runs decode the same number of tokens with the same batch alive at every step; they run
interleaved, round by round (this machine's speed drifts), best round reported, with ratios.
The mask replay times `fill_masks` alone on valid JSON, next to the free decode step it adds to.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Any

import torch

SCHEMA: dict[str, Any] = {"type": "array", "minItems": 50, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "city": {"type": "string", "maxLength": 24}}}}
NAMES = ["Alice Martin", "Bob Dupont", "Chloé Bernard", "David Thomas", "Emma Petit",
         "François Robert", "Giulia Rossi", "Hugo Moreau", "Inès Laurent", "Jules Simon"]
CITIES = ["Paris", "Lyon", "Marseille", "Toulouse", "Nice", "Nantes", "Strasbourg", "Lille"]
PROMPT = ("<|im_start|>user\nList fifty people with their name, age and city as JSON."
          "<|im_end|>\n<|im_start|>assistant\n")


def wait_for_quiet(seconds: float) -> float:
    """Wait up to `seconds` for the 1-minute load average to fall below the core count."""
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + seconds
    while os.getloadavg()[0] >= cores and time.monotonic() < deadline:
        time.sleep(10)
    load = os.getloadavg()[0]
    if load >= cores:
        print(f"machine busy: load average {load:.1f} on {cores} cores; timings are pessimistic")
    return load


def decode_round(llm: Any, prompt_ids: list[int], batch: int, num_tokens: int,
                 grammar: Any) -> float:
    """Generated tokens per second for `batch` copies of the prompt, each `num_tokens` long."""
    from levante import SamplingParams

    params = SamplingParams(max_tokens=num_tokens, temperature=0.7, ignore_eos=True)
    engine = llm.engine
    start = time.perf_counter()
    pending = {engine.add_request(prompt_ids, params, grammar=grammar) for _ in range(batch)}
    num_generated = 0
    while pending:
        for out in engine.step():
            num_generated += len(out.new_token_ids)
            if out.finished:
                assert out.finish_reason == "length", out.finish_reason
                pending.discard(out.request_id)
    return num_generated / (time.perf_counter() - start)


def example_ids(tokenizer: Any, seed: int, num_tokens: int) -> list[int]:
    """Token ids of a valid answer to SCHEMA (its first num_tokens)."""
    rng = random.Random(seed)
    people = [{"name": rng.choice(NAMES), "age": rng.randint(0, 99), "city": rng.choice(CITIES)}
              for _ in range(50)]
    ids = tokenizer.encode(json.dumps(people, ensure_ascii=False))
    assert len(ids) >= num_tokens
    return ids[:num_tokens]


def mask_round(grammar: Any, sequences: list[list[int]], vocab_size: int) -> float:
    """Milliseconds per step of `fill_masks` over the batch, replaying `sequences`."""
    from levante.structured import fill_masks

    matchers = [grammar.matcher() for _ in sequences]
    elapsed = 0.0
    for step in range(len(sequences[0])):
        start = time.perf_counter()
        allowed = fill_masks(matchers, vocab_size)
        elapsed += time.perf_counter() - start
        for row, (matcher, ids) in enumerate(zip(matchers, sequences)):
            assert allowed[row, ids[step]]
            matcher.consume(ids[step])
    return elapsed / len(sequences[0]) * 1e3


def tool_definitions(count: int, family: str) -> list[dict[str, Any]]:
    """`count` functions with a small object schema; `family` keeps sets apart in the cache."""
    return [{"type": "function", "function": {"name": f"{family}_{i}", "parameters": {
        "type": "object", "required": ["city"], "properties": {
            "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}}}}}
        for i in range(count)]


def first_token_seconds(llm: Any, compiler: Any, prompt_ids: list[int],
                        tools: list[dict[str, Any]]) -> tuple[float, float]:
    """(compile s, time to first token s) of one request constrained to call one of `tools`."""
    from levante import SamplingParams
    from levante.chat.tools import validate_tools

    start = time.perf_counter()
    grammar = compiler.compile(tools=validate_tools(tools), tool_choice="required",
                               chat_style="json")
    compiled = time.perf_counter()
    request_id = llm.engine.add_request(prompt_ids, SamplingParams(max_tokens=1),
                                        grammar=grammar)
    while not any(out.request_id == request_id and out.new_token_ids
                  for out in llm.engine.step()):
        pass
    while llm.engine.has_work:
        llm.engine.step()
    return compiled - start, time.perf_counter() - start


def tools_table(llm: Any, compiler: Any, prompt_ids: list[int]) -> None:
    """Time to first token with 1, 16 and 128 tools: first request, then the cached repeat."""
    print(f"{'tools':>5}{'compile ms':>12}{'first TTFT ms':>15}{'cached TTFT ms':>16}"
          f"{'cached/first':>14}")
    for count in (1, 16, 128):
        tools = tool_definitions(count, f"set{count}")
        compile_s, first = first_token_seconds(llm, compiler, prompt_ids, tools)
        _, cached = first_token_seconds(llm, compiler, prompt_ids, tools)
        print(f"{count:>5}{compile_s * 1e3:>12.1f}{first * 1e3:>15.1f}{cached * 1e3:>16.1f}"
              f"{cached / first:>14.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wait-quiet", type=float, default=60.0)
    parser.add_argument("--tools-only", action="store_true",
                        help="only the time-to-first-token table with tools")
    args = parser.parse_args()

    from levante import LLM
    from levante.chat.grammars import GrammarCompiler

    llm = LLM(args.ref, max_model_len=1024)
    start = time.perf_counter()
    compiler = GrammarCompiler(llm.tokenizer)
    built = time.perf_counter()
    grammar = compiler.compile(response_format={"type": "json_schema", "json_schema": {
        "name": "people", "schema": SCHEMA}}, chat_style="json")
    compiled = time.perf_counter()
    vocab_size = llm.bundle.config.vocab_size
    prompt_ids = llm.tokenizer.encode(PROMPT)
    load = wait_for_quiet(args.wait_quiet)
    print(f"model {args.ref}; prompt {len(prompt_ids)} tokens; {args.tokens} new tokens per "
          f"sequence; torch threads {torch.get_num_threads()}; {os.cpu_count()} cores; load "
          f"average {load:.2f}; llguidance tokenizer {(built - start) * 1e3:.0f} ms, grammar "
          f"compile {(compiled - built) * 1e3:.1f} ms")
    tools_table(llm, compiler, prompt_ids)
    if args.tools_only:
        return
    best: dict[tuple[str, int], float] = {}
    for round_index in range(args.rounds):
        for batch in (1, 8):
            for name, constraint in [("free", None), ("json", grammar)]:
                speed = decode_round(llm, prompt_ids, batch, args.tokens, constraint)
                best[name, batch] = max(best.get((name, batch), 0.0), speed)
            sequences = [example_ids(llm.tokenizer, round_index * 8 + i, args.tokens)
                         for i in range(batch)]
            ms = mask_round(grammar, sequences, vocab_size)
            best["mask", batch] = min(best.get(("mask", batch), float("inf")), ms)
    print(f"{'batch':>5}{'free tok/s':>12}{'json tok/s':>12}{'cost/token':>12}"
          f"{'step ms':>10}{'mask ms':>10}{'mask/step':>11}")
    for batch in (1, 8):
        free = best["free", batch]
        step_ms = batch / free * 1e3
        mask_ms = best["mask", batch]
        constrained = best["json", batch]
        print(f"{batch:>5}{free:>12.1f}{constrained:>12.1f}{free / constrained - 1:>+12.1%}"
              f"{step_ms:>10.1f}{mask_ms:>10.2f}{mask_ms / step_ms:>11.2%}")


if __name__ == "__main__":
    main()
