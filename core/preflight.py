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


def load_student_tokenizer(config: RunConfig) -> Any:
    from transformers import AutoTokenizer

    student = config.student
    return AutoTokenizer.from_pretrained(resolve_path(student.tokenizer or student.model, config))


def _differences(ours: dict[str, int], theirs: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(set(ours.items()) ^ set(theirs.items()))[:5]


def vocabulary_problems(config: RunConfig, manager: PluginManager, student_tokenizer: Any) -> list[str]:
    """A problem per teacher whose tokenizer (its ``tokenizer`` key, else where its backend says it
    lives) differs from the student's; a teacher with neither is not checked."""
    from transformers import AutoTokenizer

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
        theirs = AutoTokenizer.from_pretrained(source).get_vocab()
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
