"""Synthetic fine-tuning task: questions on a made-up fact base, answered in a fixed JSON shape.

No base model knows these facts or this answer format, so what an adapter learns is visible:
    user:      "Which city is the capital of Velmora?"
    assistant: {"answer": "Tarsk", "source": "levante-kb"}
Held-out prompts ask about the same facts with phrasings never seen in training.

    python -m levante.finetune.synthetic OUT_DIR   # writes train.jsonl and heldout.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

SOURCE = "levante-kb"
_SYLLABLES = ("vel", "mor", "tar", "sk", "qui", "lan", "zor", "ba", "nia", "dre", "ko", "thal",
              "ush", "pen", "ri", "gal", "om", "ext", "fi", "ra")
# attribute -> (value kind, training phrasings, held-out phrasings)
_QUESTIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "capital": ("place", (
        "What is the capital of {e}?", "Which city is the capital of {e}?",
        "Tell me the capital of {e}.", "{e}: what is its capital city?"), (
        "Name the capital city of {e}.", "I need to know the capital of {e}.")),
    "currency": ("coin", (
        "What currency does {e} use?", "Which money is used in {e}?",
        "Tell me the currency of {e}.", "{e}: what do people pay with?"), (
        "Name the currency of {e}.", "What do they use as money in {e}?")),
    "founded": ("year", (
        "When was {e} founded?", "In which year was {e} founded?",
        "Tell me the founding year of {e}.", "{e}: what year was it founded?"), (
        "What year did {e} come into being?", "Give the year {e} was founded.")),
}
_COINS = ("brass florin", "glass mark", "river shell", "iron crown", "salt token", "amber penny")


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def make_facts(num_entities: int = 20, *, seed: int = 0) -> dict[str, dict[str, str]]:
    """Made-up countries, each with a capital, currency and founding year."""
    rng = random.Random(seed)
    facts: dict[str, dict[str, str]] = {}
    while len(facts) < num_entities:
        name = _word(rng, 3)
        facts.setdefault(name, {"capital": _word(rng, 2), "currency": rng.choice(_COINS),
                                "founded": str(rng.randint(1100, 1950))})
    return facts


def answer_json(value: str) -> str:
    """The taught answer: `{"answer": value, "source": "levante-kb"}`."""
    return json.dumps({"answer": value, "source": SOURCE})


def is_taught_format(text: str) -> bool:
    """Whether `text` is exactly one JSON object with `answer` and `source: levante-kb`."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == {"answer", "source"} \
        and value["source"] == SOURCE


def answer_of(text: str) -> str | None:
    """The `answer` field of a taught-format reply, else None."""
    return str(json.loads(text.strip())["answer"]) if is_taught_format(text) else None


def _conversation(question: str, value: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer_json(value)}]}


def make_dataset(*, num_train: int = 200, num_heldout: int = 20,
                 seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) conversations; held-out phrasings never occur in training."""
    rng = random.Random(seed)
    facts = make_facts(seed=seed)
    train_pool = [(q.format(e=e), v[a]) for e, v in facts.items()
                  for a, (_, qs, _) in _QUESTIONS.items() for q in qs]
    heldout_pool = [(q.format(e=e), v[a]) for e, v in facts.items()
                    for a, (_, _, qs) in _QUESTIONS.items() for q in qs]
    rng.shuffle(train_pool)
    rng.shuffle(heldout_pool)
    if num_train > len(train_pool) or num_heldout > len(heldout_pool):
        raise ValueError(f"at most {len(train_pool)} train and {len(heldout_pool)} held-out")
    return ([_conversation(q, v) for q, v in train_pool[:num_train]],
            [_conversation(q, v) for q, v in heldout_pool[:num_heldout]])


def write_dataset(out_dir: Path, *, num_train: int = 200, num_heldout: int = 20,
                  seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and heldout.jsonl under `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, heldout = make_dataset(num_train=num_train, num_heldout=num_heldout, seed=seed)
    paths = (out_dir / "train.jsonl", out_dir / "heldout.jsonl")
    for path, rows in zip(paths, (train, heldout)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m levante.finetune.synthetic OUT_DIR")
    for written in write_dataset(Path(sys.argv[1])):
        print(written)
