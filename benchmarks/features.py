"""Prefix caching and prompt-lookup speculative decoding, each on vs off, in one run.

1. Prefix caching: a multi-turn chat (a ~500-token system prompt, then user turns whose
   greedy answers go back into the history) run by two engines that differ only in
   `enable_prefix_caching`. Prints time to first token per turn, on / off / ratio, and the
   share of each turn's prompt served from the cache (`Request.num_cached_tokens`).
2. Speculative decoding: greedy batch-1 answers to prompts whose output repeats the input
   (repeat, fix typos, rename a variable) and one free-form question, with
   `num_speculative_tokens` 0 and each of --spec-tokens. Prints decode tokens/s, the ratio to
   no speculation, the acceptance rate (`Engine.num_accepted_tokens / num_draft_tokens`) and
   output tokens per engine step.

3. All together: 8 and 32 requests at once (half share a system prompt, half copy their
   input) on engines with no feature, prefix caching, speculation, and both; prints aggregate
   tokens/s, all-on over the best single setting, and whether greedy outputs are identical.

The first two parts check greedy outputs with the feature on against off: equal, or parting only at
a near-tie (`divergence`). With GGUF weights the kernel's int8 activations amplify float
noise (another split of the same attention sums) into logit differences of a few tenths, so
runs part where the top two are close (seen: gaps up to 0.49 nats); with --quant none the
outputs are equal throughout. Engines share one loaded model; rounds are interleaved (order
rotated) because this machine's speed drifts, and the best round of each is kept.

    .venv/bin/python benchmarks/features.py [--ref smollm2] [--quant gguf] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

SYSTEM_PROMPT = (
    "You are Atlas, the support assistant of Northwind Outfitters, a shop that sells hiking, "
    "camping and climbing gear online and in twelve stores. Follow these rules in every answer. "
    "Be brief: answer in two or three sentences unless the customer asks for detail. Be "
    "friendly but never use slang. Never invent prices, stock levels or delivery dates; if you "
    "do not know, say so and point the customer to the order page or to a store. Orders ship "
    "within two working days from the central warehouse. Standard delivery takes three to five "
    "working days; express delivery takes one or two working days and costs nine euros. "
    "Delivery is free for orders above sixty euros. Customers may return unused items within "
    "thirty days of delivery for a full refund; worn shoes and opened fuel canisters cannot be "
    "returned. Refunds reach the original payment method within ten working days after the "
    "warehouse receives the parcel. Exchanges for another size are free and are handled as a "
    "return plus a new order. The warranty on tents, backpacks and sleeping bags is two years "
    "and covers defects in material and workmanship, not wear, misuse or damage from fire. "
    "Climbing ropes, harnesses and carabiners are safety equipment: never give advice on "
    "whether a used piece is still safe, and tell the customer to retire any rope that has "
    "held a severe fall. Stores open from nine to seven on weekdays and from ten to six on "
    "Saturdays; they are closed on Sundays and public holidays. The loyalty programme gives one "
    "point per euro spent; one hundred points are worth five euros off a later order, and "
    "points expire after two years. Gift cards are valid for three years and cannot be "
    "exchanged for cash. If a customer is angry, apologise once, stay calm and offer a concrete "
    "next step. If a customer asks about something unrelated to the shop, answer briefly if "
    "it is harmless and then steer back to how you can help with their gear. Never ask for a "
    "full card number or a password. For questions about an existing order, ask for the order "
    "number, which starts with NW followed by eight digits. Our customer service team can be "
    "reached by phone from eight to eight on weekdays. When you recommend products, prefer "
    "durable items and mention how to care for them: dry tents before storing them, wash "
    "down jackets rarely and with special soap, and store sleeping bags loosely in a large "
    "cotton sack rather than in their compression bag.")

USER_TURNS = (
    ("Hello! I ordered a two-person tent last week and it still has not arrived. The order "
     "number is NW12345678. Can you tell me what usually causes a delay like this?"),
    ("Thanks. If it arrives and I do not like the colour, can I send it back and get my money "
     "returned to my credit card, and how long would that take?"),
    ("I also want to buy a down sleeping bag for autumn trips in the mountains. What should I "
     "look for, and how do I store it at home between trips?"),
    ("My old climbing rope is six years old but looks fine to me. Do you think I can keep "
     "using it for another season of indoor and outdoor climbing?"),
    ("Okay, fair enough. I have four hundred loyalty points from earlier purchases. How much "
     "are they worth, and do they expire at some point in the future?"),
    ("Last question: is the store in the city centre open this Sunday afternoon, and if not, "
     "when can I come by to try on some hiking boots?"),
)

PARAGRAPH = (
    "The river rises in the northern hills and flows south through a wide valley of farms and "
    "small villages. In spring the snow melts and the water runs fast and cold, and the old "
    "stone bridges are sometimes closed for a few days. By late summer the river is slow and "
    "shallow, and children swim in the pools below the mill.")
TYPO_PARAGRAPH = (
    "The river rises in the nothern hills and flows south trough a wide valley of farms and "
    "smal villages. In spring the snow melts and the water runs fast and cold, and the old "
    "stone bridges are sometmes closed for a few days. By late sumer the river is slow and "
    "shalow, and children swim in the pools below the mill.")
CODE = (
    "def mean(values):\n"
    "    x = 0\n"
    "    for value in values:\n"
    "        x += value\n"
    "    return x / len(values)\n")

SPEC_PROMPTS = {
    "repeat": "Repeat the following text exactly:\n\n" + PARAGRAPH,
    "typos": "Fix the typos in this text:\n\n" + TYPO_PARAGRAPH,
    "rename": "Rename the variable x to count in this code:\n\n```python\n" + CODE + "```",
    "free-form": "What are three good habits for staying healthy while working at a desk?",
}
REPEATING = ("repeat", "typos", "rename")  # prompts whose answer should copy the input


@dataclass
class Turn:
    """One chat turn as one engine ran it."""

    num_cached_tokens: int
    ttft_s: float
    token_ids: list[int]


@dataclass
class Chat:
    """One round of the chat: each turn's prompt, and each engine's turns."""

    prompt_ids: list[list[int]]
    turns: dict[str, list[Turn]]


@dataclass
class Decode:
    """One greedy answer as one engine ran it, with the speculation counters' deltas."""

    token_ids: list[int]
    decode_s: float
    num_steps: int
    num_draft_tokens: int
    num_accepted_tokens: int

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.token_ids) - 1) / max(self.decode_s, 1e-9)


def run_request(engine: Any, prompt_ids: list[int], params: Any) -> tuple[Any, list[int],
                                                                          float, float, int]:
    """Run one request alone: its Request, output ids, TTFT, decode seconds, decode steps."""
    start = time.perf_counter()
    request_id = engine.add_request(prompt_ids, params)
    request = engine.requests[request_id]
    token_ids: list[int] = []
    first = 0.0
    num_steps = 0
    finished = False
    while not finished:
        outputs = engine.step()
        num_steps += 1
        for out in outputs:
            if out.request_id != request_id:
                continue
            if out.error:
                raise RuntimeError(f"request failed: {out.error}")
            if out.new_token_ids and not token_ids:
                first = time.perf_counter()
                num_steps = 0  # count decode steps only
            token_ids.extend(out.new_token_ids)
            finished = out.finished
    return request, token_ids, first - start, time.perf_counter() - first, num_steps


def divergence(reference: Any, prompt_ids: list[int], expected: list[int], got: list[int],
               tie_nats: float) -> str | None:
    """None if `got` equals `expected`; a note if they first part at a near-tie; else raise.

    The int8 activations of the GGUF kernel turn float-noise differences (another chunking of
    the same attention sums) into logit differences up to ~0.6, so two greedy runs may pick
    different tokens where the top two are that close. `reference`, an engine without the
    feature, rescores the shared prefix; a token outside its top 5, or a gap over `tie_nats`,
    is a real difference and fails the benchmark.
    """
    from levante import SamplingParams

    if got == expected:
        return None
    n = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b),
             min(len(expected), len(got)))
    if n >= min(len(expected), len(got)):
        raise AssertionError(f"outputs differ in length only: {len(expected)} vs {len(got)}")
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    request_id = reference.add_request(prompt_ids + expected[:n], params)
    out = reference.run_to_completion([request_id])[request_id][0]
    top = dict(out.top_logprobs[0] or [])
    if expected[n] not in top or got[n] not in top:
        raise AssertionError(f"token {n}: {expected[n]} vs {got[n]}, not both in the "
                             f"reference's top 5 {top}")
    gap = abs(top[expected[n]] - top[got[n]])
    if gap > tie_nats:
        raise AssertionError(f"token {n}: {expected[n]} vs {got[n]}, logit gap {gap:.3f} > "
                             f"{tie_nats} (not a near-tie)")
    return f"token {n}: {expected[n]} vs {got[n]}, near-tie (gap {gap:.3f} nats)"


def run_chat(llm: Any, engines: dict[str, Any], session: int, args: argparse.Namespace
             ) -> Chat:
    """The chat, each turn on every engine in turn; the history takes the "off" answers.

    `session` tags the system prompt, so no round finds an earlier round's blocks cached.
    """
    from levante import SamplingParams

    params = SamplingParams(max_tokens=args.answer_tokens, temperature=0.0)
    messages: list[dict[str, str]] = [
        {"role": "system", "content": f"Session {session}. {SYSTEM_PROMPT}"}]
    order = list(engines) if session % 2 == 0 else list(reversed(engines))
    chat = Chat([], {name: [] for name in engines})
    for user in USER_TURNS[:args.turns]:
        messages.append({"role": "user", "content": user})
        prompt_ids = llm.encode_chat(messages)
        chat.prompt_ids.append(prompt_ids)
        for name in order:
            request, token_ids, ttft, _, _ = run_request(engines[name], prompt_ids, params)
            chat.turns[name].append(Turn(request.num_cached_tokens, ttft, token_ids))
        messages.append({"role": "assistant",
                         "content": llm.tokenizer.decode(chat.turns["off"][-1].token_ids)})
    return chat


def bench_prefix_caching(llm: Any, args: argparse.Namespace) -> None:
    """Multi-turn chat TTFT with the prefix cache on vs off; greedy outputs must agree."""
    from levante.engine.engine import Engine

    engines = {name: Engine(llm.bundle.model, llm.tokenizer,
                            engine_config(args, enable_prefix_caching=on))
               for name, on in (("on", True), ("off", False))}
    rounds = [run_chat(llm, engines, r, args) for r in range(args.rounds)]
    notes = []
    for r, chat in enumerate(rounds):
        for t, (on, off) in enumerate(zip(chat.turns["on"], chat.turns["off"])):
            note = divergence(engines["off"], chat.prompt_ids[t], off.token_ids, on.token_ids,
                              args.tie_nats)
            if note:
                notes.append(f"round {r + 1} turn {t + 1}, {note}")
    print_prefix_table(rounds, notes, args)


def print_prefix_table(rounds: list[Chat], notes: list[str], args: argparse.Namespace) -> None:
    """TTFT per turn on / off (best round each), cache share, and the output check."""
    num_turns = len(rounds[0].prompt_ids)
    best = {name: [min(chat.turns[name][t].ttft_s for chat in rounds) for t in range(num_turns)]
            for name in ("on", "off")}
    sizes = [len(ids) for ids in rounds[0].prompt_ids]
    cached = [turn.num_cached_tokens for turn in rounds[0].turns["on"]]
    print(f"\nprefix caching: {num_turns}-turn chat, first prompt {sizes[0]} tokens (system "
          f"prompt + one user turn), answers up to {args.answer_tokens} tokens, greedy; TTFT "
          f"best of {args.rounds}")
    print(f"{'turn':<6}{'prompt':>8}{'cached':>8}{'TTFT on':>10}{'TTFT off':>10}{'off/on':>8}")
    for t in range(num_turns):
        print(f"{t + 1:<6}{sizes[t]:>8}{cached[t] / sizes[t]:>8.0%}"
              f"{best['on'][t] * 1e3:>8.0f}ms{best['off'][t] * 1e3:>8.0f}ms"
              f"{best['off'][t] / best['on'][t]:>7.2f}x")
    total_on, total_off = sum(best["on"]), sum(best["off"])
    print(f"{'total':<6}{sum(sizes):>8}{sum(cached) / sum(sizes):>8.0%}"
          f"{total_on * 1e3:>8.0f}ms{total_off * 1e3:>8.0f}ms{total_off / total_on:>7.2f}x")
    print(f"{'mean':<22}{total_on / num_turns * 1e3:>8.0f}ms{total_off / num_turns * 1e3:>8.0f}ms")
    print(f"greedy outputs on = off in {args.rounds * num_turns - len(notes)} of "
          f"{args.rounds * num_turns} turns" + "".join(f"\n  {note}" for note in notes))


def run_decode(engine: Any, prompt_ids: list[int], params: Any) -> Decode:
    """One greedy answer, with the engine's speculation counters' change over it."""
    drafts, accepted = engine.num_draft_tokens, engine.num_accepted_tokens
    _, token_ids, _, decode_s, num_steps = run_request(engine, prompt_ids, params)
    return Decode(token_ids, decode_s, num_steps, engine.num_draft_tokens - drafts,
                  engine.num_accepted_tokens - accepted)


def bench_speculation(llm: Any, args: argparse.Namespace) -> None:
    """Greedy decode speed with prompt-lookup drafts of each length vs none; outputs agree."""
    from levante import SamplingParams
    from levante.engine.engine import Engine

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
    variants = [0, *args.spec_tokens]
    engines = {k: Engine(llm.bundle.model, llm.tokenizer,
                         engine_config(args, num_speculative_tokens=k)) for k in variants}
    prompts = {name: llm.encode_chat([{"role": "user", "content": text}])
               for name, text in SPEC_PROMPTS.items()}
    runs: dict[tuple[str, int], list[Decode]] = {(p, k): [] for p in prompts for k in variants}
    for r in range(args.rounds):
        for name, prompt_ids in prompts.items():
            for k in variants[r % len(variants):] + variants[:r % len(variants)]:
                runs[name, k].append(run_decode(engines[k], prompt_ids, params))
    notes = []
    for (name, k), decodes in runs.items():
        for r, decode in enumerate(decodes):
            note = divergence(engines[0], prompts[name], runs[name, 0][0].token_ids,
                              decode.token_ids, args.tie_nats)
            if note:
                notes.append(f"{name}, k={k}, round {r + 1}, {note}")
    print_spec_table(llm, prompts, runs, notes, args)


def print_spec_table(llm: Any, prompts: dict[str, list[int]],
                     runs: dict[tuple[str, int], list[Decode]], notes: list[str],
                     args: argparse.Namespace) -> None:
    """Decode speed per prompt and k (best round), acceptance, tokens per step, the check."""
    variants = [0, *args.spec_tokens]
    print(f"\nspeculative decoding (prompt lookup, n-gram {args.ngram}): greedy, batch 1, up to "
          f"{args.new_tokens} new tokens; decode tok/s best of {args.rounds}")
    print(f"{'prompt':<11}{'prompt':>7}{'output':>7}{'k':>3}{'decode tok/s':>13}{'vs k=0':>8}"
          f"{'accepted':>9}{'tok/step':>9}")
    for name, prompt_ids in prompts.items():
        base = max(d.decode_tokens_per_s for d in runs[name, 0])
        for k in variants:
            decodes = runs[name, k]
            speed = max(d.decode_tokens_per_s for d in decodes)
            last = decodes[-1]
            rate = (f"{last.num_accepted_tokens / last.num_draft_tokens:.0%}"
                    if last.num_draft_tokens else "-")
            per_step = (len(last.token_ids) - 1) / max(last.num_steps, 1)
            print(f"{name if k == 0 else '':<11}{len(prompt_ids) if k == 0 else '':>7}"
                  f"{len(last.token_ids) if k == 0 else '':>7}{k:>3}{speed:>13.1f}"
                  f"{speed / base:>7.2f}x{rate:>9}{per_step:>9.2f}")
    num_runs = sum(len(d) for d in runs.values())
    print(f"greedy outputs equal k=0's first in {num_runs - len(notes)} of {num_runs} runs"
          + "".join(f"\n  {note}" for note in notes))
    if args.show_outputs:
        for name in prompts:
            print(f"  {name}: {llm.tokenizer.decode(runs[name, 0][0].token_ids)!r}")


SETTINGS = {"plain": {}, "prefix cache": {"enable_prefix_caching": True},
            "speculation": {"num_speculative_tokens": 4},
            "all": {"enable_prefix_caching": True, "num_speculative_tokens": 4}}


def combined_workload(llm: Any, clients: int, session: str) -> list[list[int]]:
    """Half support-chat turns sharing the system prompt, half prompts that copy their input."""
    prompts = []
    for i in range(clients):
        if i % 2 == 0:
            messages = [{"role": "system", "content": f"Session {session}. {SYSTEM_PROMPT}"},
                        {"role": "user", "content": USER_TURNS[i // 2 % len(USER_TURNS)]}]
        else:
            text = list(SPEC_PROMPTS.values())[i // 2 % len(SPEC_PROMPTS)]
            messages = [{"role": "user", "content": f"({session}-{i}) {text}"}]
        prompts.append(llm.encode_chat(messages))
    return prompts


def bench_combined(llm: Any, args: argparse.Namespace) -> None:
    """Aggregate tokens/s of a mixed batch with no feature, each alone, and all together."""
    from levante import SamplingParams
    from levante.config import EngineConfig
    from levante.engine.engine import Engine

    params = SamplingParams(max_tokens=args.combined_tokens, temperature=0.0, ignore_eos=True)
    print(f"\nall features together: {'/'.join(map(str, args.clients))} requests at once "
          f"(half a shared ~500-token system prompt, half copy-the-input prompts), "
          f"{args.combined_tokens} greedy tokens each; aggregate tokens/s, best of "
          f"{args.rounds}")
    print(f"{'clients':>8}" + "".join(f"{name:>14}" for name in SETTINGS)
          + f"{'all/best':>10}{'same tokens':>13}")
    for clients in args.clients:
        engines = {name: Engine(llm.bundle.model, llm.tokenizer, EngineConfig(
            max_model_len=args.max_model_len, max_num_seqs=clients, block_size=16,
            num_kv_blocks=clients * 1024 // 16, **features))
            for name, features in SETTINGS.items()}
        best = dict.fromkeys(SETTINGS, 0.0)
        outputs: dict[str, list[list[int]]] = {}
        for r in range(args.rounds):
            prompts = combined_workload(llm, clients, f"{clients}.{r}")
            names = list(SETTINGS)
            for name in names[r % len(names):] + names[:r % len(names)]:
                engine = engines[name]
                start = time.perf_counter()
                ids = [engine.add_request(p, params) for p in prompts]
                outs = engine.run_to_completion(ids)
                elapsed = time.perf_counter() - start
                tokens = [[t for o in outs[i] for t in o.new_token_ids] for i in ids]
                best[name] = max(best[name], sum(map(len, tokens)) / elapsed)
                if r == 0:
                    outputs[name] = tokens
        singles = max(best[name] for name in SETTINGS if name != "all")
        same = sum(outputs[name] == outputs["plain"] for name in SETTINGS)
        print(f"{clients:>8}" + "".join(f"{best[name]:>14.1f}" for name in SETTINGS)
              + f"{best['all'] / singles:>9.2f}x{same:>9} of {len(SETTINGS)}")


def engine_config(args: argparse.Namespace, **features: Any) -> Any:
    """One request at a time, a pool big enough to keep every round's conversation cached."""
    from levante.config import EngineConfig

    return EngineConfig(max_model_len=args.max_model_len, max_num_seqs=1,
                        num_kv_blocks=4 * args.max_model_len // 16, block_size=16,
                        speculative_ngram=args.ngram, **features)


def positive_ints(text: str) -> list[int]:
    """`3,5` -> [3, 5], each 1..16 (what EngineConfig allows)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(not 1 <= v <= 16 for v in values):
        raise argparse.ArgumentTypeError(f"each speculative token count must be 1..16, "
                                         f"got {text!r}")
    return values


def positive_ints_any(text: str) -> list[int]:
    """`8,32` -> [8, 32], each >= 1."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"each must be at least 1, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="smollm2")
    parser.add_argument("--quant", default="gguf", help="weights: gguf (kept quantized) | none "
                        "(dequantized to float32) | int8 | int4")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--turns", type=positive_int, default=len(USER_TURNS),
                        help=f"chat turns, at most {len(USER_TURNS)}")
    parser.add_argument("--answer-tokens", type=positive_int, default=32,
                        help="most tokens per chat answer")
    parser.add_argument("--new-tokens", type=positive_int, default=96,
                        help="most tokens per speculative-decoding answer")
    parser.add_argument("--spec-tokens", type=positive_ints, default=[3, 5],
                        help="speculative token counts to compare with none, e.g. 3,5")
    parser.add_argument("--ngram", type=positive_int, default=3,
                        help="EngineConfig.speculative_ngram")
    parser.add_argument("--tie-nats", type=float, default=1.0,
                        help="largest logit gap at which on/off outputs may part (GGUF "
                        "noise: gaps up to 0.49 seen)")
    parser.add_argument("--max-model-len", type=positive_int, default=2048)
    parser.add_argument("--only", choices=("prefix", "spec", "combined"), default=None,
                        help="run one of the three parts")
    parser.add_argument("--clients", type=positive_ints_any, default=[8, 32],
                        help="requests at once in the combined part, e.g. 8,32")
    parser.add_argument("--combined-tokens", type=positive_int, default=64,
                        help="greedy tokens per request in the combined part")
    parser.add_argument("--show-outputs", action="store_true",
                        help="print the greedy answers to the speculation prompts")
    args = parser.parse_args(argv)
    if args.turns > len(USER_TURNS):
        parser.error(f"--turns must be at most {len(USER_TURNS)}, got {args.turns}")

    import torch

    from levante import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(args.ref, max_model_len=args.max_model_len, quant=args.quant)
    print(f"model {args.ref} (quant {args.quant}); device cpu; {torch.get_num_threads()} "
          f"threads; load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}",
          flush=True)
    # Warm-up: a two-chunk prefill and a few decode steps (a first call may build kernels).
    llm.generate(llm.encode_chat([{"role": "system", "content": SYSTEM_PROMPT * 2}])[:700],
                 SamplingParams(max_tokens=4, temperature=0.0))
    if args.only in (None, "prefix"):
        bench_prefix_caching(llm, args)
    if args.only in (None, "spec"):
        bench_speculation(llm, args)
    if args.only in (None, "combined"):
        bench_combined(llm, args)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
