"""GSM8K: answers extracted as lm-evaluation-harness does; exact match scored with stderr."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from levante.errors import ModelFileError
from levante.eval.gsm8k import STOP, extract_flexible, extract_strict, read_problems, run_gsm8k
from levante.eval.tasks import LocalModel

# Two rows as the HF `gsm8k` dataset (main split) writes them.
ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                 "many clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
               "<<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A shop sells 1,250 pens a week. How many pens does it sell in 4 weeks?",
     "answer": "1,250 * 4 = 5,000\n#### 5,000"},
    {"question": "Tom has $3 and spends $5. How many dollars is he short?",
     "answer": "5 - 3 = 2\n#### 2"},
]


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


@pytest.mark.parametrize("output,strict,flexible", [
    ("She sold 24 in May, so 48 + 24 = 72.\n#### 72", "72", "72"),
    ("The total is $5,000.", None, "5000"),
    ("#### 1,250.", "1250", "1250"),
    ("No idea.", None, None),
    ("First 3, then -4", None, "-4"),
])
def test_extraction(output: str, strict: str | None, flexible: str | None) -> None:
    assert extract_strict(output) == strict
    assert extract_flexible(output) == flexible


def test_reads_targets_after_hashes(data: Path) -> None:
    assert [p.target for p in read_problems(data)] == ["72", "5000", "2"]


def test_answer_without_hashes_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "72"}) + "\n")
    with pytest.raises(ModelFileError, match="record 0"):
        read_problems(path)


def test_scores_exact_match(data: Path) -> None:
    replies = {ROWS[0]["question"]: "48 + 24 = 72\n#### 72",
               ROWS[1]["question"]: "It sells 5,000 pens.",
               ROWS[2]["question"]: "#### 8"}
    seen: list[str] = []

    class Fake(LocalModel):
        def chat(self, prompts: list[str], *, max_tokens: int, stop: Any) -> list[str]:
            assert tuple(stop) == STOP and max_tokens == 64
            seen.extend(prompts)
            return [next(r for q, r in replies.items() if q in p) for p in prompts]

    llm = SimpleNamespace(bundle=SimpleNamespace(chat_format=object()))
    result = run_gsm8k(Fake("fake", llm), data, max_tokens=64)
    flexible, strict = result.metrics
    assert (flexible.name, flexible.value) == ("exact_match", pytest.approx(2 / 3))
    assert (strict.name, strict.value) == ("exact_match_strict", pytest.approx(1 / 3))
    assert flexible.stderr == pytest.approx(((2 / 3) * (1 / 3) / 2) ** 0.5)
    assert len(seen) == 3 and all("####" in p for p in seen)


def test_local_model_generates_end_to_end(data: Path, smollm2_gguf: Path) -> None:
    """The real SmolLM2 through the chat template and engine (few tokens: it is no mathematician)."""
    from levante.eval.tasks import open_model

    model = open_model(str(smollm2_gguf))
    result = run_gsm8k(model, data, limit=1, max_tokens=8)
    assert result.num_samples == 1
    outputs = [s["output"] for s in result.samples]
    assert all(isinstance(o, str) and o.strip() for o in outputs)
    assert not any("Question:" in o for o in outputs)
