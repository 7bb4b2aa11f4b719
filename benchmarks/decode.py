"""Prefill and decode tokens/s of Levante next to transformers, same model, prompt and run.

Usage: .venv/bin/python benchmarks/decode.py [--ref smollm2] [--tokens 64] [--rounds 3]
Both engines run greedy at batch 1 on the same prompt, interleaved round by round (this
machine's speed drifts); the best round of each is reported with the ratio.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

PROMPT = ("The history of astronomy is long and rich. Early observers tracked the motions of "
          "the sun, the moon and the planets, and built calendars around them. ") * 4


def levante_round(llm, prompt_ids: list[int], num_tokens: int) -> tuple[float, float]:
    from levante import SamplingParams

    done = llm.generate(prompt_ids, SamplingParams(max_tokens=num_tokens, temperature=0.0,
                                                   ignore_eos=True))[0]
    return done.prefill_tokens_per_s, done.decode_tokens_per_s


def hf_round(model, prompt_ids: list[int], num_tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = len(prompt_ids) / (time.perf_counter() - start)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(num_tokens - 1):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = (num_tokens - 1) / (time.perf_counter() - start)
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from levante import LLM
    from levante.weights.hub import resolve

    path = resolve(args.ref)
    llm = LLM(args.ref, max_model_len=2048)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              torch_dtype=torch.float32).eval()
    prompt_ids = llm.encode_prompt(PROMPT)
    print(f"model {args.ref} ({path.name}); prompt {len(prompt_ids)} tokens; "
          f"{args.tokens} new tokens; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    rows: dict[str, list[tuple[float, float]]] = {"levante": [], "transformers": []}
    levante_round(llm, prompt_ids, 4)  # warm-up
    hf_round(hf, prompt_ids, 4)
    for _ in range(args.rounds):
        rows["levante"].append(levante_round(llm, prompt_ids, args.tokens))
        rows["transformers"].append(hf_round(hf, prompt_ids, args.tokens))
    best = {k: (max(p for p, _ in v), max(d for _, d in v)) for k, v in rows.items()}
    print(f"{'engine':<14}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name, (prefill, decode) in best.items():
        print(f"{name:<14}{prefill:>15.1f}{decode:>15.1f}")
    lv, hf_best = best["levante"], best["transformers"]
    print(f"{'ratio':<14}{lv[0] / hf_best[0]:>14.2f}x{lv[1] / hf_best[1]:>14.2f}x")


if __name__ == "__main__":
    main()
