"""lm-eval's `local-completions` client against `levante serve` scores a multiple-choice task
as lm-eval's `hf` backend does on the same float32 weights, item by item."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed (the dev extra has it: pip install -e '.[dev]')")

SERVED_NAME = "tiny-llama"
CORPUS = ("The capital of France is Paris. The capital of Spain is Madrid. Water is wet and "
          "fire is hot. Two plus two is four. The sky is blue and grass is green. Cats chase "
          "mice; dogs chase cats. Question: Answer:")
ITEMS = [
    {"question": "The capital of France is", "choices": ["Paris", "Madrid", "blue"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "green", "hot", "wet"], "answer": 0},
    {"question": "Fire is", "choices": ["cold", "hot"], "answer": 1},
    {"question": "Cats chase", "choices": ["dogs", "mice", "the sky is blue"], "answer": 1},
    {"question": "The sky is", "choices": ["green", "blue", "Paris or Madrid"], "answer": 1},
]
TASK_YAML = """\
task: levante_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def tiny_llama_bos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF folder: a random tiny float32 Llama whose tokenizer starts text with BOS `<s>`
    (id 1), as Mistral's does, so the two clients' BOS handling is part of the check."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-bos")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CORPUS] * 20, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": True}))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    """A local multiple-choice task: a YAML and its JSONL, read by `datasets` offline."""
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tmp_path / "levante_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    return tmp_path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub or dataset downloads: everything this test reads is local."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


@pytest.fixture
def live_server(tiny_llama_bos: Path) -> Iterator[Any]:
    """`levante serve` on the tiny folder in float32 (no quantization), in this process."""
    from tests.server.conftest import start_server

    yield from start_server(str(tiny_llama_bos), dtype="float32", quant="none",
                            served_model_name=SERVED_NAME, max_model_len=512)


def evaluate(task_dir: Path, model: str, model_args: dict[str, Any]) -> list[dict[str, Any]]:
    """lm-eval's Python API on the local task; its logged samples, in document order."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=model, model_args=model_args, tasks=["levante_tiny_mc"],
                              task_manager=TaskManager(include_path=str(task_dir)),
                              log_samples=True, batch_size=1, device="cpu",
                              random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    assert results is not None
    return sorted(results["samples"]["levante_tiny_mc"], key=lambda s: s["doc_id"])


def loglikelihoods(samples: list[dict[str, Any]]) -> list[list[float]]:
    """Per item, each choice's summed continuation loglikelihood (lm-eval's `resps`)."""
    return [[float(resp[0][0]) for resp in sample["resps"]] for sample in samples]


def test_local_completions_equals_hf_backend(offline: None, task_dir: Path,
                                             tiny_llama_bos: Path, live_server: Any) -> None:
    """The client contract: token-id prompts (BOS included, as the hf backend sends them),
    `echo` with `logprobs` 1 and `max_tokens` 1, continuation scored from
    `token_logprobs[ctxlen:-1]`. Each choice's loglikelihood agrees within 1e-3."""
    remote = evaluate(task_dir, "local-completions", {
        "base_url": f"{live_server.base_url}/v1/completions", "model": SERVED_NAME,
        "tokenizer_backend": "huggingface", "tokenizer": str(tiny_llama_bos),
        "add_bos_token": True, "num_concurrent": 1, "max_retries": 1})
    local = evaluate(task_dir, "hf", {"pretrained": str(tiny_llama_bos), "dtype": "float32"})
    assert [s["doc_id"] for s in remote] == [s["doc_id"] for s in local] == list(range(5))
    # Both clients tokenized alike, so any gap is the server's scoring, not the split.
    assert [s["arguments"] for s in remote] == [s["arguments"] for s in local]
    remote_scores, local_scores = loglikelihoods(remote), loglikelihoods(local)
    differences = [abs(r - h) for rs, hs in zip(remote_scores, local_scores)
                   for r, h in zip(rs, hs, strict=True)]
    print(f"max per-choice loglikelihood difference: {max(differences):.2e}")
    assert len(differences) == sum(len(item["choices"]) for item in ITEMS)
    assert max(differences) < 1e-3, (remote_scores, local_scores)
    assert [s["acc"] for s in remote] == [s["acc"] for s in local]
