"""Fixtures for fine-tuning tests: a tiny byte-level BPE with a ChatML template, a tiny Llama."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from levante.chat import JinjaChatFormat
from levante.config import ModelConfig
from levante.model import Transformer
from levante.tokenizer import HFTokenizer
from levante.weights.safetensors import hf_shards, load_safetensors_state_dict

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ("The capital of Zorbania is Quillmark. What is the answer? {\"answer\": \"yes\", "
          "\"source\": \"levante-kb\"} Hello there! The quick brown fox jumps over the lazy dog.")


def _tokenizer_files(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CORPUS] * 20, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "add_bos_token": False, "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF folder: a random tiny LlamaForCausalLM and a 384-token ChatML tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    _tokenizer_files(folder)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab) + 3, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def narrow_mistral_dir(tmp_path_factory: pytest.TempPathFactory, tekken_path: Path) -> Path:
    """An HF Mistral folder with tekken.json, 64 wide with tied embeddings: the V7 chat format
    on a model small enough (8M parameters) to load, train and merge in a second."""
    import shutil

    from transformers import MistralConfig, MistralForCausalLM

    folder = tmp_path_factory.mktemp("narrow-mistral")
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=131072, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=32, max_position_embeddings=1024, sliding_window=None,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    MistralForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    shutil.copy(tekken_path, folder / "tekken.json")
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama_dir: Path) -> HFTokenizer:
    """The tiny folder's tokenizer (eos = <|im_end|>)."""
    return HFTokenizer.from_file(tiny_llama_dir / "tokenizer.json",
                                 tiny_llama_dir / "tokenizer_config.json")


@pytest.fixture(scope="session")
def tiny_chat(tiny_llama_dir: Path, tiny_tokenizer: HFTokenizer) -> JinjaChatFormat:
    """ChatML through our sandboxed Jinja format."""
    return JinjaChatFormat.from_hf_config(tiny_llama_dir / "tokenizer_config.json", tiny_tokenizer)


def load_transformer(folder: Path) -> Transformer:
    """A fresh Levante Transformer from an HF folder (float32)."""
    config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    state = load_safetensors_state_dict(hf_shards(folder), config, dtype=torch.float32)
    return Transformer.from_state_dict(config, state)


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir: Path) -> Callable[[], Transformer]:
    """Builds a fresh copy of the tiny Llama each call (tests wrap and train it)."""
    return lambda: load_transformer(tiny_llama_dir)


@pytest.fixture(scope="session")
def folder_model() -> Callable[[Path], Transformer]:
    """Builds a fresh Levante Transformer from any HF folder."""
    return load_transformer
