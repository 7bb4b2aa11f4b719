"""MMLU-style multiple choice: loglikelihood of each choice, locally or from an endpoint that
scores echoed prompts (else a letter by generation)."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from levante.errors import ModelFileError, RequestError
from levante.eval.tasks import (
    LOCAL_CHUNK,
    EndpointModel,
    LocalModel,
    TaskResult,
    mean_metric,
    read_records,
    require_fields,
)

LETTERS = string.ascii_uppercase
MAX_BATCH_TOKENS = 4096  # tokens per forward pass when scoring
STYLES = ("letter", "text")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; `answer` indexes `choices`."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""


@dataclass(frozen=True)
class ChoiceScores:
    """Per-choice loglikelihoods of one question and which choice each metric picks."""

    logprobs: tuple[float, ...]  # sum of log p(continuation tokens | prompt), one per choice
    is_greedy: tuple[bool, ...]  # whether each continuation is the model's argmax path
    predicted: int  # argmax of logprobs
    predicted_norm: int  # argmax of logprobs / len(continuation text), lm-eval's acc_norm


def sample_path() -> Path:
    """The small MMLU-format sample shipped with Levante (20 original questions)."""
    return Path(str(resources.files("levante") / "data" / "mmlu_sample.jsonl"))


def read_questions(path: str | Path | None = None, *, limit: int | None = None) -> list[Question]:
    """Questions from HF `cais/mmlu` rows ({question, choices, answer}) or A/B/C/D columns."""
    path = Path(path) if path is not None else sample_path()
    questions = []
    for i, row in enumerate(read_records(path, limit=limit)):
        require_fields(path, i, row, ["question"])
        if "choices" in row:
            choices = row["choices"]
        else:
            letters = [c for c in LETTERS if c in row]
            choices = [row[c] for c in letters]
        if not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) for c in choices):
            raise ModelFileError(path, f"record {i}: need 'choices' (a list of >= 2 strings) or "
                                 "A/B/C/D fields")
        require_fields(path, i, row, ["answer"])
        questions.append(Question(str(row["question"]), tuple(choices),
                                  _answer_index(path, i, row["answer"], len(choices)),
                                  str(row.get("subject", ""))))
    return questions


def _answer_index(path: Path, index: int, answer: Any, num_choices: int) -> int:
    if isinstance(answer, str) and answer.strip().upper() in LETTERS[:num_choices]:
        return LETTERS.index(answer.strip().upper())
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < num_choices:
        return answer
    raise ModelFileError(path, f"record {index}: answer {answer!r} is not a choice index "
                         f"0..{num_choices - 1} or letter")


def format_prompt(question: Question) -> str:
    """lm-evaluation-harness's MMLU prompt: subject header, question, lettered choices, 'Answer:'."""
    subject = question.subject.replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n" \
        if subject else "The following are multiple choice questions (with answers).\n\n"
    lines = [question.question.strip()]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices)]
    return header + "\n".join(lines) + "\nAnswer:"


def continuations(question: Question, style: str) -> list[str]:
    """' A', ' B', ... (style 'letter', as lm-eval's mmlu) or ' ' + choice text ('text')."""
    if style not in STYLES:
        raise RequestError(f"style must be one of {STYLES}, got {style!r}", param="style")
    if style == "letter":
        return [f" {LETTERS[i]}" for i in range(len(question.choices))]
    return [f" {choice}" for choice in question.choices]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids split as lm-eval does: encode both together, cut at the
    context's length, so the boundary tokenizes as it would in running text."""
    context_ids = tokenizer.encode(context, add_bos=tokenizer.should_add_bos)
    whole = tokenizer.encode(context + continuation, add_bos=tokenizer.should_add_bos)
    if len(whole) <= len(context_ids):
        raise RequestError(f"continuation {continuation!r} adds no tokens after its context")
    return whole[:len(context_ids)], whole[len(context_ids):]


@torch.inference_mode()
def loglikelihoods(model: Any, requests: Sequence[tuple[list[int], list[int]]], *,
                   max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), is_greedy) for each (context_ids, continuation_ids).

    Each request needs the forward pass of context + continuation[:-1]; requests with the same
    input (the four one-token letters of a question) share one row. Only rows of equal length
    share a [B, S] batch: padding would change a row's attention shape, and with quantized
    kernels (activations rounded to 8 bits, as llama.cpp does) a 1e-7 change there grows to
    ~0.2 nats, so a score would depend on its neighbours. Unpadded, each score is what the row
    gets alone.
    """
    rows: dict[tuple[int, ...], list[int]] = {}
    for index, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise RequestError(f"request {index}: context and continuation must be non-empty")
        row = tuple(context + continuation[:-1])
        if len(row) > model.config.max_seq_len:
            raise RequestError(f"request {index}: {len(row)} tokens exceed the model's context "
                               f"{model.config.max_seq_len}")
        rows.setdefault(row, []).append(index)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    device = model.rope_cos.device  # the embedding may be a memory-mapped GGUF table
    for batch in _batches(list(rows), max_batch_tokens):
        hidden = model(torch.tensor(batch, device=device))  # [B, S, dim]
        for b, row in enumerate(batch):
            for index in rows[row]:
                context, continuation = requests[index]
                results[index] = _score(model, hidden[b], len(context), continuation)
    return results


def engine_loglikelihoods(engine: Any, requests: Sequence[tuple[list[int], list[int]]]
                          ) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), is_greedy) for each (context_ids, continuation_ids),
    from the engine's prompt logprobs: the numbers `levante serve` echoes for the same ids,
    so a local `levante eval` and one through --base-url score alike. (A plain forward pass,
    `loglikelihoods`, differs from the engine's prefill with quantized kernels, whose 8-bit
    activations turn a different batch shape into a different score.)"""
    from levante.engine.sampling_params import SamplingParams

    scoring = SamplingParams(max_tokens=0, prompt_logprobs=1)
    results: list[tuple[float, bool]] = []
    for start in range(0, len(requests), LOCAL_CHUNK):
        chunk = requests[start:start + LOCAL_CHUNK]
        for index, (context, continuation) in enumerate(chunk, start):
            if not context or not continuation:
                raise RequestError(f"request {index}: context and continuation must be "
                                   "non-empty")
        ids = [engine.add_request(context + continuation, scoring) for context, continuation
               in chunk]
        outputs = engine.run_to_completion(ids)
        for request_id, (context, _) in zip(ids, chunk):
            # entry i scores prompt token i + 1, so the continuation's start at len(context) - 1
            scores = outputs[request_id][-1].prompt_logprobs[len(context) - 1:]
            results.append((sum(lp for _, lp, _ in scores),
                            all(top and lp >= top[0][1] for _, lp, top in scores)))
    return results


def _batches(rows: list[tuple[int, ...]], max_batch_tokens: int) -> list[list[tuple[int, ...]]]:
    """Rows of one length together, <= max_batch_tokens tokens (or one row) per batch."""
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for row in rows:
        by_length.setdefault(len(row), []).append(row)
    batches: list[list[tuple[int, ...]]] = []
    for length in sorted(by_length, reverse=True):
        per_batch = max(1, max_batch_tokens // length)
        same = by_length[length]
        batches += [same[i:i + per_batch] for i in range(0, len(same), per_batch)]
    return batches


def _score(model: Any, hidden: torch.Tensor, context_len: int,
           continuation: list[int]) -> tuple[float, bool]:
    """Positions context_len-1 .. context_len+n-2 of `hidden` [S, dim] predict the n tokens."""
    positions = slice(context_len - 1, context_len - 1 + len(continuation))
    logprobs = torch.log_softmax(model.logits(hidden[positions]), dim=-1)  # [n, vocab]
    targets = torch.tensor(continuation, device=logprobs.device)
    total = logprobs.gather(1, targets[:, None]).sum().item()
    return total, bool((logprobs.argmax(-1) == targets).all().item())


def score_questions(model: Any, tokenizer: Any, questions: Sequence[Question], *,
                    style: str = "letter") -> list[ChoiceScores]:
    """Loglikelihood of every choice of every question under `model` (a Transformer), by a
    plain forward pass (`run_mmlu` scores through the engine instead)."""
    pairs, spans, texts = _choice_pairs(questions, style)
    requests = [encode_pair(tokenizer, context, option) for context, option in pairs]
    return _choice_scores(loglikelihoods(model, requests), spans, texts)


def _choice_pairs(questions: Sequence[Question], style: str
                  ) -> tuple[list[tuple[str, str]], list[tuple[int, int]], list[str]]:
    """(context, continuation) text per choice of every question, each question's span of
    them, and the continuations (for acc_norm's lengths)."""
    pairs: list[tuple[str, str]] = []
    spans, texts = [], []
    for question in questions:
        context, options = format_prompt(question), continuations(question, style)
        spans.append((len(pairs), len(pairs) + len(options)))
        pairs += [(context, option) for option in options]
        texts += options
    return pairs, spans, texts


def _choice_scores(scores: Sequence[tuple[float, bool]], spans: list[tuple[int, int]],
                   texts: list[str]) -> list[ChoiceScores]:
    """Per question: the choices' loglikelihoods and what acc and acc_norm pick."""
    out = []
    for start, end in spans:
        logprobs = [s for s, _ in scores[start:end]]
        normed = [lp / len(texts[start + i].encode("utf-8")) for i, lp in enumerate(logprobs)]
        out.append(ChoiceScores(tuple(logprobs), tuple(g for _, g in scores[start:end]),
                                _argmax(logprobs), _argmax(normed)))
    return out


def _local_scores(llm: Any, questions: Sequence[Question], style: str) -> list[ChoiceScores]:
    """Loglikelihoods from the engine of `llm` (a levante.llm.LLM), as the server computes them."""
    pairs, spans, texts = _choice_pairs(questions, style)
    requests = [encode_pair(llm.tokenizer, context, option) for context, option in pairs]
    return _choice_scores(engine_loglikelihoods(llm.engine, requests), spans, texts)


def _endpoint_scores(model: EndpointModel, questions: Sequence[Question],
                     style: str) -> list[ChoiceScores] | None:
    """Loglikelihoods from an endpoint that scores echoed prompts; None if it does not
    (then the letter is asked for by generation)."""
    import openai

    pairs, spans, texts = _choice_pairs(questions, style)
    try:
        return _choice_scores(model.loglikelihoods(pairs), spans, texts)
    except openai.BadRequestError:
        return None


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def generation_prompt(question: Question) -> str:
    """The MMLU prompt for a chat endpoint, asking for the letter alone."""
    letters = ", ".join(LETTERS[:len(question.choices)])
    return format_prompt(question).removesuffix("\nAnswer:") + \
        f"\n\nAnswer with only the letter ({letters}) of the correct choice."


def parse_letter(text: str, num_choices: int) -> int | None:
    """The choice a free-text answer names: 'B', '(B)', 'B. Paris', 'The answer is B'."""
    letters = LETTERS[:num_choices]
    patterns = (rf"(?i:answer is):?\s*\(?([{letters}])\b",  # 'The answer is B'
                rf"^\(?([{letters}])(?:[).:\s]|$)",  # 'B', '(B)', 'B. Paris'
                rf"\b([{letters}])\b")  # first standalone capital letter
    for pattern in patterns:
        match = re.search(pattern, text.strip())
        if match:
            return LETTERS.index(match.group(1))
    return None


def run_mmlu(model: LocalModel | EndpointModel, data: str | Path | None = None, *,
             limit: int | None = None, style: str = "letter") -> TaskResult:
    """Accuracy on a multiple-choice file: loglikelihoods (locally, or from an endpoint that
    scores echoed prompts), else letters by generation from the endpoint."""
    path = Path(data) if data is not None else sample_path()
    questions = read_questions(path, limit=limit)
    scores: list[ChoiceScores] | None
    if isinstance(model, LocalModel):
        scores = _local_scores(model.llm, questions, style)
    else:
        scores = _endpoint_scores(model, questions, style)
    if scores is not None:
        samples = [{"subject": q.subject, "answer": q.answer, "predicted": s.predicted,
                    "logprobs": list(s.logprobs)} for q, s in zip(questions, scores)]
        metrics = [mean_metric("acc", [float(s.predicted == q.answer)
                                       for q, s in zip(questions, scores)])]
        if style == "text":
            metrics.append(mean_metric("acc_norm", [float(s.predicted_norm == q.answer)
                                                    for q, s in zip(questions, scores)]))
        config: dict[str, Any] = {"method": "loglikelihood", "style": style}
    else:
        assert isinstance(model, EndpointModel)
        answers = model.chat([generation_prompt(q) for q in questions], max_tokens=32, stop=[])
        picked = [parse_letter(a, len(q.choices)) for q, a in zip(questions, answers)]
        samples = [{"subject": q.subject, "answer": q.answer, "predicted": p, "response": a}
                   for q, p, a in zip(questions, picked, answers)]
        metrics = [mean_metric("acc", [float(p == q.answer) for q, p in zip(questions, picked)])]
        config = {"method": "generation"}
    return TaskResult("mmlu", model.name, metrics, len(questions), str(path), config, samples)

