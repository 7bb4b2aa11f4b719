"""Multiple choice: our loglikelihoods equal transformers' on the real SmolLM2, letters parse."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from levante.eval.choice import (
    Question,
    encode_pair,
    format_prompt,
    loglikelihoods,
    parse_letter,
    read_questions,
    run_mmlu,
    score_questions,
)
from levante.eval.tasks import EndpointModel, LocalModel


@pytest.fixture(scope="module")
def smollm2_bundle(smollm2_gguf: Path) -> Any:
    import levante.bundle

    return levante.bundle.load(str(smollm2_gguf))


@pytest.fixture(scope="module")
def smollm2_exact(smollm2_gguf: Path) -> Any:
    """The same file dequantized to float32: the math transformers does, to compare with it.
    (The default load computes on the file's blocks with 8-bit activations, as llama.cpp does.)"""
    import levante.bundle

    return levante.bundle.load(str(smollm2_gguf), quant="none")


@torch.inference_mode()
def hf_loglikelihood(hf_model: Any, context: list[int], continuation: list[int],
                     cache: dict[tuple[int, ...], torch.Tensor]) -> float:
    """Reference: transformers' logits for the unpadded sequence, log_softmax, summed.

    The forward pass is cached per input, so the four one-token letters share one.
    """
    ids = tuple(context + continuation[:-1])
    if ids not in cache:
        cache[ids] = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    logprobs = cache[ids]
    n = len(context)
    return sum(logprobs[n - 1 + i, t].item() for i, t in enumerate(continuation))


def test_shipped_sample_is_well_formed() -> None:
    questions = read_questions()
    assert len(questions) == 20
    assert all(len(q.choices) == 4 and 0 <= q.answer < 4 and q.subject for q in questions)
    assert len({q.answer for q in questions}) == 4  # answers spread over all letters


@pytest.mark.parametrize("style", ["letter", "text"])
def test_choice_scores_match_transformers(smollm2_exact: Any, hf_smollm2: tuple[Any, Any],
                                          style: str) -> None:
    questions = read_questions(limit=20 if style == "letter" else 2)
    scores = score_questions(smollm2_exact.model, smollm2_exact.tokenizer, questions,
                             style=style)
    tokenizer, cache = smollm2_exact.tokenizer, {}
    for question, score in zip(questions, scores):
        options = [f" {'ABCD'[i]}" if style == "letter" else f" {c}"
                   for i, c in enumerate(question.choices)]
        expected = [hf_loglikelihood(hf_smollm2[0], *encode_pair(tokenizer, format_prompt(question),
                                                              option), cache)
                    for option in options]
        assert score.logprobs == pytest.approx(expected, abs=1e-3)
        assert score.predicted == max(range(4), key=expected.__getitem__)


def test_batched_equals_one_at_a_time(smollm2_bundle: Any) -> None:
    """On the default (quantized-kernel) load a score must not depend on its batch neighbours."""
    tokenizer = smollm2_bundle.tokenizer
    questions = read_questions(limit=2)
    context = format_prompt(questions[0])
    requests = [encode_pair(tokenizer, format_prompt(q), f" {c}") for q in questions
                for c in q.choices]
    # distinct rows of one length, so they really share a batch: the context's last token varies
    base, _ = encode_pair(tokenizer, context, " A")
    requests += [(base[:-1] + [t], [330, 331]) for t in (330, 331, 332)]
    batched = loglikelihoods(smollm2_bundle.model, requests)
    alone = loglikelihoods(smollm2_bundle.model, requests, max_batch_tokens=1)
    assert [s for s, _ in batched] == [s for s, _ in alone]
    assert len({len(c) for _, c in requests}) > 1  # multi-token continuations
    rows = {tuple(c + t[:-1]) for c, t in requests}
    assert len(rows) - len({len(r) for r in rows}) >= 2  # distinct rows share a length


def test_run_mmlu_local_reports_accuracy_with_stderr(smollm2_bundle: Any) -> None:
    from levante.llm import LLM

    model = LocalModel("smollm2", LLM(smollm2_bundle))
    result = run_mmlu(model, limit=8)
    acc = result.metrics[0]
    assert acc.name == "acc" and result.num_samples == 8
    correct = [s["predicted"] == s["answer"] for s in result.samples]
    assert acc.value == sum(correct) / 8
    p = acc.value
    assert acc.stderr == pytest.approx((p * (1 - p) / 7) ** 0.5)


def test_reads_lettered_columns(tmp_path: Path) -> None:
    path = tmp_path / "mmlu.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "A": "3", "B": "4", "C": "5", "D": "6",
                                "answer": "B"}) + "\n")
    assert read_questions(path) == [Question("2+2?", ("3", "4", "5", "6"), 1, "")]


def test_bad_answer_names_the_record(tmp_path: Path) -> None:
    from levante.errors import ModelFileError

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(ModelFileError, match="record 0: answer 5"):
        read_questions(path)


@pytest.mark.parametrize("text,expected", [("B", 1), (" (C)", 2), ("D. Tokyo", 3),
                                           ("The answer is A.", 0), ("I think it's C", 2),
                                           ("A good answer is B", 1), ("none", None)])
def test_parse_letter(text: str, expected: int | None) -> None:
    assert parse_letter(text, 4) == expected


def test_endpoint_answers_by_generation() -> None:
    questions = read_questions(limit=4)
    replies = iter(["B", "The answer is C", "D", "A"])

    def create(**kwargs: Any) -> Any:
        assert kwargs["temperature"] == 0.0
        message = SimpleNamespace(content=next(replies))
        return SimpleNamespace(choices=[SimpleNamespace(message=message)])

    def refuse_echo(**kwargs: Any) -> Any:  # an endpoint that cannot score prompts
        import httpx
        import openai

        request = httpx.Request("POST", "http://endpoint/v1/completions")
        raise openai.BadRequestError("echo is not supported", body=None,
                                     response=httpx.Response(400, request=request))

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)),
                             completions=SimpleNamespace(create=refuse_echo))
    with pytest.MonkeyPatch.context() as mp:  # one worker: replies arrive in question order
        mp.setattr("levante.eval.tasks.ENDPOINT_WORKERS", 1)
        result = run_mmlu(EndpointModel("remote", client), limit=4)
    assert [s["predicted"] for s in result.samples] == [1, 2, 3, 0]
    expected = sum(p == q.answer for p, q in zip([1, 2, 3, 0], questions)) / 4
    assert result.metrics[0].value == expected


def test_endpoint_scores_choices_from_echoed_prompt_logprobs(smollm2_bundle: Any) -> None:
    """Against `levante serve`, multiple choice is scored from echoed prompt logprobs: each
    choice's loglikelihood is the sum over its tokens of what the engine computes for that
    prompt (the same numbers in-process), and the result names the method."""
    import openai

    from levante.config import EngineConfig
    from levante.engine.engine import Engine
    from levante.engine.sampling_params import SamplingParams
    from levante.eval.choice import continuations, encode_pair, format_prompt
    from tests.server.conftest import start_server

    questions = read_questions(limit=3)
    for live in start_server("smollm2", smollm2_bundle):
        client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="x", max_retries=0)
        remote = run_mmlu(EndpointModel("smollm2", client), limit=3)
    assert remote.config["method"] == "loglikelihood"
    engine = Engine(smollm2_bundle.model, smollm2_bundle.tokenizer,
                    EngineConfig(max_model_len=2048))
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=0)
    for question, sample in zip(questions, remote.samples):
        expected = []
        for option in continuations(question, "letter"):
            context, continuation = encode_pair(smollm2_bundle.tokenizer,
                                                format_prompt(question), option)
            rid = engine.add_request(context + continuation, scoring)
            scores = engine.run_to_completion([rid])[rid][-1].prompt_logprobs
            expected.append(sum(lp for _, lp, _ in scores[len(context) - 1:]))
        assert sample["logprobs"] == pytest.approx(expected, abs=1e-5)


def test_local_and_endpoint_scores_agree(smollm2_bundle: Any) -> None:
    """`levante eval` in-process and through --base-url against `levante serve` give the same
    per-choice loglikelihoods on the default (quantized-kernel) load: both come from the
    engine's prompt logprobs. (A plain forward pass differs on this load; printed.)"""
    import openai

    from levante.llm import LLM
    from tests.server.conftest import start_server

    questions = read_questions(limit=6)
    local = run_mmlu(LocalModel("smollm2", LLM(smollm2_bundle)), limit=6)
    for live in start_server("smollm2", smollm2_bundle):
        client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="x", max_retries=0)
        remote = run_mmlu(EndpointModel("smollm2", client), limit=6)
    assert local.config == remote.config == {"method": "loglikelihood", "style": "letter"}
    gaps = [abs(a - b) for s, r in zip(local.samples, remote.samples)
            for a, b in zip(s["logprobs"], r["logprobs"], strict=True)]
    forward = score_questions(smollm2_bundle.model, smollm2_bundle.tokenizer, questions)
    forward_gaps = [abs(a - b) for s, f in zip(local.samples, forward)
                    for a, b in zip(s["logprobs"], f.logprobs, strict=True)]
    print(f"local vs endpoint: max {max(gaps):.2e}; plain forward vs engine: "
          f"max {max(forward_gaps):.2e}")
    assert len(gaps) == 24 and max(gaps) < 1e-3
    assert [s["predicted"] for s in local.samples] == [s["predicted"] for s in remote.samples]
