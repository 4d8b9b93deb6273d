"""Config-time checks that read files: the student's and every teacher's tokenizer.

On-policy distillation compares logprobs token by token, so every teacher must share the student's
vocabulary. ``distill-run validate`` runs these checks, and so does a run before it loads a model.
"""

from __future__ import annotations

from typing import Any

from distill.config import RunConfig, config_context, resolve_path
from distill.errors import ConfigError, UnknownComponentError
from distill.manager import PluginManager

__all__ = ["load_student_tokenizer", "vocabulary_problems", "preflight"]


def _load_tokenizer(source: str, path: str) -> tuple[Any, list[str]]:
    """The tokenizer at ``source``, or a problem saying why it cannot be loaded (at ``path``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source), []
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, [f"cannot load a tokenizer from {source!r} ({reason}) @ {path}"]


def load_student_tokenizer(config: RunConfig) -> Any:
    """The student's tokenizer (``student.tokenizer``, else its model's), or a config error."""
    student = config.student
    path = "student.tokenizer" if student.tokenizer else "student.model"
    tokenizer, problems = _load_tokenizer(resolve_path(student.tokenizer or student.model, config), path)
    if problems:
        raise ConfigError(problems, config.source)
    return tokenizer


def _differences(ours: dict[str, int], theirs: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(set(ours.items()) ^ set(theirs.items()))[:5]


def vocabulary_problems(config: RunConfig, manager: PluginManager, student_tokenizer: Any) -> list[str]:
    """A problem per teacher whose tokenizer (its ``tokenizer`` key, else where its backend says it
    lives) differs from the student's; a teacher with neither is not checked."""
    ours = student_tokenizer.get_vocab()
    context = config_context(config, manager)
    problems = []
    for ref, teacher in zip(context.teachers, config.teachers, strict=True):
        if teacher.tokenizer:
            source, path = resolve_path(teacher.tokenizer, config), f"{ref.path}.tokenizer"
        else:
            try:
                source, path = manager.get("teacher", ref.backend).tokenizer_of(ref.options, context), ref.path
            except UnknownComponentError:
                continue
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


def preflight(config: RunConfig, manager: PluginManager) -> None:
    """Raise :class:`ConfigError` with every file-level problem of ``config``."""
    problems = vocabulary_problems(config, manager, load_student_tokenizer(config))
    if problems:
        raise ConfigError(problems, config.source)
