"""GSM8K-style math word problems: greedy generation, exact match on the final number."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from levante.eval.tasks import (
    EndpointModel,
    LocalModel,
    TaskResult,
    mean_metric,
    read_records,
    require_fields,
)

# lm-evaluation-harness's gsm8k filters: "strict-match" wants the dataset's "#### N" line,
# "flexible-extract" takes the last number in the output.
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORED = (re.compile(r","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
INSTRUCTION = ("Solve the following math word problem. Reason step by step, then write the "
               "final answer alone on the last line as '#### <number>'.")
STOP = ("Question:", "\n\n\n")


@dataclass(frozen=True)
class Problem:
    """One word problem and its reference answer (a number as text)."""

    question: str
    target: str


def normalize(text: str) -> str:
    """lm-eval's gsm8k normalization: drop commas, '$', everything up to '#### ', a final '.'."""
    for pattern in IGNORED:
        text = pattern.sub("", text)
    return text.strip().lower()


def extract_strict(output: str) -> str | None:
    """The number after the first '#### ', as the dataset writes answers."""
    match = STRICT.search(output)
    return normalize(match.group(1)) if match else None


def extract_flexible(output: str) -> str | None:
    """The last number anywhere in the output."""
    matches = FLEXIBLE.findall(output)
    if not matches:
        return None
    return normalize(next(group for group in matches[-1] if group))


def read_problems(path: str | Path, *, limit: int | None = None) -> list[Problem]:
    """Rows of HF `gsm8k` ({question, answer: '... #### 72'}); the target is after '####'."""
    problems = []
    for i, row in enumerate(read_records(path, limit=limit)):
        require_fields(path, i, row, ["question", "answer"])
        target = extract_strict(str(row["answer"]))
        if target is None:
            from levante.errors import ModelFileError

            raise ModelFileError(path, f"record {i}: answer has no '#### <number>' line")
        problems.append(Problem(str(row["question"]), target))
    return problems


def prompt(problem: Problem) -> str:
    """The zero-shot prompt sent as one user message (or completed raw, without a template)."""
    return f"{INSTRUCTION}\n\nQuestion: {problem.question}\n"


def run_gsm8k(model: LocalModel | EndpointModel, data: str | Path, *, limit: int | None = None,
              max_tokens: int = 512) -> TaskResult:
    """Exact match of the final number: flexible (last number) and strict ('#### N')."""
    problems = read_problems(data, limit=limit)
    prompts = [prompt(p) for p in problems]
    if isinstance(model, LocalModel) and model.llm.bundle.chat_format is None:
        outputs = model.complete([p + "Answer:" for p in prompts], max_tokens=max_tokens,
                                 stop=STOP)
    else:
        outputs = model.chat(prompts, max_tokens=max_tokens, stop=STOP)
    flexible = [extract_flexible(o) for o in outputs]
    strict = [extract_strict(o) for o in outputs]
    metrics = [mean_metric("exact_match", [float(f == p.target) for f, p in zip(flexible, problems)]),
               mean_metric("exact_match_strict",
                           [float(s == p.target) for s, p in zip(strict, problems)])]
    samples = [{"target": p.target, "extracted": f, "extracted_strict": s, "output": o}
               for p, f, s, o in zip(problems, flexible, strict, outputs)]
    return TaskResult("gsm8k", model.name, metrics, len(problems), str(data),
                      {"max_tokens": max_tokens, "num_fewshot": 0}, samples)
