"""Sliding-window perplexity against transformers' strided loss on the same weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from levante.config import ModelConfig
from levante.errors import ConfigError, ModelFileError
from levante.eval.perplexity import evaluate_perplexity, perplexity, window_targets
from levante.model import Transformer
from levante.weights.safetensors import hf_shards, load_safetensors_state_dict

CORPUS = Path(__file__).parents[2] / "src" / "levante" / "data" / "corpus.txt"


def test_window_targets_example() -> None:
    assert window_targets(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]


@pytest.mark.parametrize(("num_tokens", "window", "stride"), [(10, 4, 2), (37, 8, 8), (37, 8, 3),
                                                              (5, 16, 4), (100, 32, 31)])
def test_each_token_is_scored_once_given_context(num_tokens: int, window: int,
                                                 stride: int) -> None:
    scored = []
    for begin, end, first in window_targets(num_tokens, window, stride):
        assert begin < first <= end and end - begin <= window
        scored.extend(range(first, end))
    assert scored == sorted(set(scored))  # ascending, no repeats
    # unscored: token 0, and with stride == window each window's first token (no context)
    starts = {0} if stride < window else set(range(0, num_tokens, stride))
    assert set(range(num_tokens)) - set(scored) == starts


@pytest.fixture(scope="module")
def pair(tiny_mistral_hf: Path) -> tuple[Transformer, torch.nn.Module]:
    from transformers import MistralForCausalLM

    config = ModelConfig.from_hf(json.loads((tiny_mistral_hf / "config.json").read_text()))
    config = config.replace(max_seq_len=128)
    ours = Transformer.from_state_dict(config, load_safetensors_state_dict(
        hf_shards(tiny_mistral_hf), config, dtype=torch.float32))
    reference = MistralForCausalLM.from_pretrained(tiny_mistral_hf, dtype=torch.float32).eval()
    return ours, reference


def hf_strided_perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int,
                          stride: int) -> float:
    """The loop from transformers' perplexity guide (labels -100 for context-only tokens).

    The guide weighs each window's mean loss by its number of labels minus one; that is
    exact only for windows that start at a target, so we count the labels the model scores.
    """
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + window, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())  # the model shifts labels
        nll_sum += float(loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize(("window", "stride"), [(32, 16), (64, 64), (24, 7)])
def test_matches_transformers_strided_perplexity(pair: tuple[Transformer, torch.nn.Module],
                                                 window: int, stride: int) -> None:
    ours, reference = pair
    ids = torch.randint(0, 131072, (1, 90), generator=torch.Generator().manual_seed(0))
    expected = hf_strided_perplexity(reference, ids, window, stride)
    got = perplexity(ours, ids[0].tolist(), window=window, stride=stride)
    assert got == pytest.approx(expected, rel=1e-4)


def test_bad_windows_are_refused(pair: tuple[Transformer, torch.nn.Module]) -> None:
    ours, _ = pair
    with pytest.raises(ConfigError, match="stride"):
        perplexity(ours, [1, 2, 3], window=4, stride=8)
    with pytest.raises(ConfigError, match="positions"):
        perplexity(ours, [1, 2, 3], window=4096, stride=8)
    with pytest.raises(ConfigError, match="at least 2"):
        perplexity(ours, [1], window=4, stride=4)


def test_evaluate_perplexity_scores_a_text_file(tiny_mistral_hf: Path, tmp_path: Path) -> None:
    from levante.bundle import load

    assert 3000 <= len(CORPUS.read_text().split()) <= 6000  # the shipped corpus
    text = CORPUS.read_text()[:600]
    excerpt = tmp_path / "excerpt.txt"
    excerpt.write_text(text)
    result = evaluate_perplexity(str(tiny_mistral_hf), excerpt, window=64, stride=32)
    bundle = load(str(tiny_mistral_hf))
    ids = bundle.tokenizer.encode(text, add_bos=bundle.tokenizer.should_add_bos)
    assert result.num_tokens == len(ids) and ids[0] == 1  # BOS first for Mistral
    assert result.perplexity == pytest.approx(perplexity(bundle.model, ids, window=64,
                                                         stride=32), rel=1e-5)
    assert result.to_json()["perplexity"] == result.perplexity
    with pytest.raises(ModelFileError, match="missing.txt"):
        evaluate_perplexity(str(tiny_mistral_hf), tmp_path / "missing.txt")
