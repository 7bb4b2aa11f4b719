"""Perplexity of a model over a text, with HF's strided sliding window."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from levante.errors import ConfigError, ModelFileError
from levante.model import Transformer

if TYPE_CHECKING:
    from levante.load_config import LoadConfig

DEFAULT_WINDOW = 512
DEFAULT_STRIDE = 256


def window_targets(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window: score tokens [first_target, end) given [begin, t).

    HF's strided method: windows start every `stride` tokens; each scores only the tokens the
    previous window did not, so every token after the first is scored once, with up to
    `window - stride` tokens of context carried over.
    Example: 10 tokens, window 4, stride 2 -> (0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8).
    """
    spans = []
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        spans.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == num_tokens:
            break
    return spans


@torch.inference_mode()
def negative_log_likelihood(model: Transformer, token_ids: list[int], *, window: int,
                            stride: int) -> tuple[float, int]:
    """(sum of -log p(token | its window's context), number of tokens scored)."""
    if not 0 < stride <= window:
        raise ConfigError(f"perplexity needs 0 < stride <= window, got stride {stride}, "
                          f"window {window}")
    if window > model.rope_cos.shape[0]:
        raise ConfigError(f"window {window} exceeds the model's {model.rope_cos.shape[0]} "
                          f"positions")
    if len(token_ids) < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens, got {len(token_ids)}")
    device = model.rope_cos.device
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    total, count = 0.0, 0
    for begin, end, first in window_targets(len(token_ids), window, stride):
        hidden = model(ids[begin:end].unsqueeze(0))[0]  # [end - begin, dim]
        # position p predicts token p + 1: targets [first, end) come from rows first-1 .. end-2
        logits = model.logits(hidden[first - 1 - begin:end - 1 - begin])
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = ids[first:end]
        total -= log_probs.gather(-1, targets[:, None]).sum().item()
        count += end - first
    return total, count


def perplexity(model: Transformer, token_ids: list[int], *, window: int, stride: int) -> float:
    """exp(mean negative log-likelihood) of `token_ids` under `model` (see `window_targets`)."""
    total, count = negative_log_likelihood(model, token_ids, window=window, stride=stride)
    return math.exp(total / count)


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity measurement, as `levante eval --task perplexity --json` prints it."""

    model: str
    data: str
    quant: str
    num_tokens: int
    window: int
    stride: int
    perplexity: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def evaluate_perplexity(ref: str, data: str | Path, *, window: int = DEFAULT_WINDOW,
                        stride: int = DEFAULT_STRIDE, quant: str | None = None,
                        load_config: LoadConfig | None = None) -> PerplexityResult:
    """Load `ref` (as `load_config` says), tokenize the UTF-8 text file `data` (BOS where
    the model wants it), score it.

    `quant` "int8"/"int4" quantizes the loaded float linears (`quantize_model`); None keeps
    the model as the loader gives it.
    """
    from levante.bundle import load
    from levante.quant.linear import quantize_model

    path = Path(data)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(path, f"cannot read the text ({e})") from None
    bundle = load(ref, load_config)
    if quant is not None:
        quantize_model(bundle.model, quant)
    token_ids = bundle.tokenizer.encode(text, add_bos=bundle.tokenizer.should_add_bos)
    start = time.perf_counter()
    value = perplexity(bundle.model, token_ids, window=window, stride=stride)
    return PerplexityResult(ref, str(path), quant or "none", len(token_ids), window, stride,
                            value, time.perf_counter() - start)
