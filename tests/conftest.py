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


def documentation_gaps(manager, docs: Path) -> list[str]:
    """What ``docs/`` does not document, read from the code: a ``### hook`` section in plugins.md
    naming each of the hook's arguments; each field of the run config's sections in
    configuration.md; each option of each installed component somewhere in the docs."""
    import re
    import typing

    import attrs

    plugins_md = (docs / "plugins.md").read_text()
    sections = dict(re.findall(r"^### `?(\w+)`?\n(.*?)(?=^##)", plugins_md + "\n##", flags=re.MULTILINE | re.DOTALL))
    gaps = []
    for name in sorted(n for n in dir(manager.hook) if n.startswith("distill_")):
        if name not in sections:
            gaps.append(f"plugins.md has no '### {name}' section")
            continue
        gaps += [f"plugins.md's {name} section does not name its argument `{arg}`"
                 for arg in getattr(manager.hook, name).spec.argnames if f"`{arg}`" not in sections[name]]

    configuration_md = (docs / "configuration.md").read_text()
    everything = "\n".join(path.read_text() for path in sorted(docs.glob("*.md")))

    def fields(cls, text, where, seen):
        if cls in seen:
            return
        seen.add(cls)
        attrs.resolve_types(cls)
        for field in attrs.fields(cls):
            if field.name not in ("options", "source") and f"`{field.name}`" not in text:
                gaps.append(f"{where} does not document {cls.__name__}.{field.name}")
            for inner in (field.type, *typing.get_args(field.type)):  # an optional table too
                if attrs.has(inner):
                    fields(inner, text, where, seen)

    seen: set[type] = set()
    fields(manager.registry.run_config, configuration_md, "configuration.md", seen)
    for kind in manager.registry.kinds:
        fields(kind.config_cls, configuration_md, "configuration.md", seen)
        for spec in manager.components(kind.name).values():
            fields(spec.config_cls, everything, "docs/", seen)
    return gaps


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def manager():
    from distill.manager import PluginManager

    return PluginManager()
