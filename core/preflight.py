"""Config-time checks against the files and the machine: the output folder, the device, the
student's model config, every tokenizer, and the data files.

On-policy distillation compares logprobs token by token, so every teacher must share the student's
vocabulary. ``distill-run validate`` runs these checks, and so does a run before it loads a model
or writes a file: a mistake found after the first steps would lose their work.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

from distill.config import RunConfig, config_context, resolve_path
from distill.data import load_dataset
from distill.errors import ConfigError, DataError, DistillError, UnknownComponentError
from distill.manager import PluginManager
from distill.protocols import SkipRow

__all__ = ["vocabulary_problems", "prompt_token_limit", "folder_problems", "preflight"]


def _missing_folder(source: str, path: str) -> list[str]:
    """A problem when ``source`` names no folder here and cannot be a hub id (``org/name``) either:
    transformers would report it as a malformed hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(source).exists():
        return []
    try:
        validate_repo_id(source)
    except HFValidationError:
        return [f"no folder {source!r}: give the folder of a Hugging Face model or a hub id @ {path}"]
    return []


def _load(loader: Any, source: str, what: str, path: str) -> tuple[Any, list[str]]:
    """``loader.from_pretrained(source)``, or a problem saying why it cannot be loaded (at ``path``)."""
    if missing := _missing_folder(source, path):
        return None, missing
    try:
        return loader.from_pretrained(source), []
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, [f"cannot load {what} from {source!r} ({reason}) @ {path}"]


def _load_tokenizer(source: str, path: str) -> tuple[Any, list[str]]:
    from transformers import AutoTokenizer

    return _load(AutoTokenizer, source, "a tokenizer", path)


def _differences(ours: dict[str, int], theirs: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(set(ours.items()) ^ set(theirs.items()))[:5]


def vocabulary_problems(config: RunConfig, manager: PluginManager, student_tokenizer: Any) -> list[str]:
    """A problem per teacher whose tokenizer (its ``tokenizer`` key, else where its backend says it
    lives) differs from the student's; a teacher with neither is not checked."""
    ours = student_tokenizer.get_vocab()
    context = config_context(config, manager)
    problems = []
    for ref, teacher in zip(context.teachers, config.teachers, strict=True):
        try:
            own = manager.get("teacher", ref.backend).tokenizer_of(ref.options, context)
        except UnknownComponentError:
            continue
        if teacher.tokenizer:
            problems += _missing_folder(own, ref.path) if own else []  # its backend still loads the model there
            source, path = resolve_path(teacher.tokenizer, config), f"{ref.path}.tokenizer"
        else:
            source, path = own, ref.path
        if source is None:
            continue
        tokenizer, unloadable = _load_tokenizer(source, path)
        problems += unloadable
        if tokenizer is None:
            continue
        theirs = tokenizer.get_vocab()
        if theirs != ours:
            problems.append(
                f"teacher '{ref.name}' does not share the student's vocabulary ({len(theirs)} vs {len(ours)} "
                f"tokens; first differences: {_differences(ours, theirs)}); on-policy distillation compares "
                f"logprobs token by token, so both must use the same tokenizer @ {path}"
            )
    return problems


def folder_problems(value: str, path: str) -> list[str]:
    """Why the folder ``value`` (at ``path``) could not be created or written: found before a run
    does any work, not when it first saves."""
    folder = Path(value).expanduser()
    if folder.exists() and not folder.is_dir():
        return [f"{value!r} is a file, not a folder: move it or choose another folder @ {path}"]
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return [f"{value!r} cannot be created: {str(existing)!r} is a file; choose another folder @ {path}"]
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return [f"{value!r} cannot be written ({exc.strerror}: {str(existing)!r}); choose a folder you can "
                f"write to @ {path}"]
    return []


def device_problems(device: str, path: str) -> list[str]:
    """A device torch does not know, or this machine lacks (``device`` at ``path``), would fail
    only when the model moves there."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        return [f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps' @ {path}"]
    count = getattr(getattr(torch, parsed.type, None), "device_count", lambda: None)()
    if count == 0:
        return [f"this machine has no {parsed.type} device (torch finds none); use 'cpu' @ {path}"]
    if count is not None and parsed.index is not None and parsed.index >= count:
        return [f"this machine has {count} {parsed.type} device(s), {parsed.type}:0 to {parsed.type}:{count - 1}; "
                f"got {device!r} @ {path}"]
    return []


def _model_config(config: RunConfig) -> tuple[Any, list[str]]:
    """The student's model config (a small JSON file: no weights are loaded)."""
    from transformers import AutoConfig

    return _load(AutoConfig, resolve_path(config.student.model, config), "a model", "student.model")


def prompt_token_limit(config: RunConfig, model_config: Any) -> int | None:
    """The longest prompt a row may have: ``data.max_prompt_tokens``, within the room the student's
    context leaves after the longest completion (sampled or evaluated)."""
    limit = config.data.max_prompt_tokens
    max_context = getattr(model_config, "max_position_embeddings", None)
    if max_context:
        room = max_context - max(config.sampling.max_new_tokens, config.eval.max_new_tokens or 0)
        limit = room if limit is None else min(limit, room)
    return limit


def _context_problems(config: RunConfig, model_config: Any) -> list[str]:
    """A completion as long as the context leaves no room for a prompt: every row would be skipped."""
    max_context = getattr(model_config, "max_position_embeddings", None)
    lengths = {"sampling.max_new_tokens": config.sampling.max_new_tokens, "eval.max_new_tokens": config.eval.max_new_tokens}
    return [f"must be below the student's context of {max_context} tokens (max_position_embeddings), which also "
            f"holds the prompt; got {tokens} @ {path}"
            for path, tokens in lengths.items() if max_context and tokens and tokens >= max_context]


def _routing_problems(config: RunConfig, manager: PluginManager, rows: Any) -> list[str]:
    """A router that sends no training row to a teacher would train on nothing and still save a model."""
    context = config_context(config, manager)
    router = manager.build("router", config.router.name, config.router.options, attrs.evolve(context, path="router"))
    skipped: Counter[str] = Counter()
    for row in rows:
        try:
            if router.route(row):
                return []
        except SkipRow as skip:
            skipped[skip.reason] += 1
        except DistillError as exc:
            return [f"{exc} @ data.train"]
    reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped.most_common())
    values = ", ".join(sorted(repr(t.route_value) for t in context.teachers))
    return [f"router '{config.router.name}' sends no row of {config.data.train!r} to a teacher (skipped: "
            f"{reasons or 'none'}); give the rows a `{router.route_key}` field holding one of {values} @ data.train"]


def _data_problems(config: RunConfig, manager: PluginManager, tokenizer: Any, limit: int | None) -> list[str]:
    """Each data file must hold a usable row, and some training row must reach a teacher."""
    views = sorted({ref.prompt_key for ref in config_context(config, manager).teachers})
    problems = []
    for path, value in (("data.train", config.data.train), ("data.eval", config.data.eval)):
        if not value:
            continue
        file = Path(resolve_path(value, config))
        if file.is_dir():
            problems.append(f"{value!r} is a folder; give a JSONL file @ {path}")
            continue
        try:
            dataset = load_dataset(file, tokenizer, max_prompt_tokens=limit, teacher_messages_keys=views)
        except DataError as exc:
            problems.append(f"{exc} @ {path}")
            continue
        if path == "data.train":
            problems += _routing_problems(config, manager, dataset.rows)
    return problems


def preflight(config: RunConfig, manager: PluginManager) -> Any:
    """Raise :class:`ConfigError` with every problem of ``config`` found against the files and the
    machine; return the student's tokenizer (a run goes on with it)."""
    problems = [*folder_problems(config.output_dir, "output_dir"), *device_problems(config.student.device, "student.device")]
    model_config, found = _model_config(config)
    no_room = _context_problems(config, model_config)
    problems += found + no_room
    student, tokenizer = config.student, None
    if student.tokenizer or model_config is not None:  # else the model's problem says it already
        tokenizer, found = _load_tokenizer(resolve_path(student.tokenizer or student.model, config),
                                           "student.tokenizer" if student.tokenizer else "student.model")
        problems += found
    if tokenizer is not None:  # the data is read with the student's tokenizer, within its context
        problems += vocabulary_problems(config, manager, tokenizer)
        if not no_room:  # else every row would be reported too long as well
            problems += _data_problems(config, manager, tokenizer, prompt_token_limit(config, model_config))
    if problems:
        raise ConfigError(problems, config.source)
    return tokenizer
