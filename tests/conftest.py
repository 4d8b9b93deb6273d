"""Shared fixtures: real (tiny) transformers models and tokenizers built locally, fresh plugin managers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|pad|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
ALPHABET = list("0123456789+-=?:. abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def build_tokenizer(path: Path, alphabet: list[str] = ALPHABET):
    """A character-level fast tokenizer with a chat template, saved with save_pretrained."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + alphabet)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|pad|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", eos_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[2:],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return tok


def build_model(path: Path, tokenizer, *, seed: int, hidden: int = 32, layers: int = 1):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
        max_position_embeddings=128, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A random tiny student and teacher sharing one tokenizer, as HF folders."""
    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(root / "tokenizer")
    build_model(root / "student", tok, seed=1)
    build_model(root / "teacher", tok, seed=2)
    return {"student": root / "student", "teacher": root / "teacher", "tokenizer": root / "tokenizer"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def manager():
    from distill.manager import PluginManager

    return PluginManager()
