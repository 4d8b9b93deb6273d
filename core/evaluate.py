"""Held-out evaluation: greedy exact-match accuracy and the sampled per-token reverse KL."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from distill.config import RunConfig
from distill.types import PromptRow, SamplingParams

__all__ = ["extract_answer", "accuracy", "evaluate", "EVAL_SEED_OFFSET"]

EVAL_SEED_OFFSET = 7_919  # eval sampling has its own seed: evaluating never moves training RNG


def extract_answer(text: str, pattern: str | None) -> str | None:
    """The answer in a completion: the pattern's first group (or whole match), else the stripped text."""
    if pattern is None:
        return text.strip()
    match = re.search(pattern, text)
    if match is None:
        return None
    return (match.group(1) if match.groups() else match.group(0)).strip()


async def accuracy(
    generator: Any,
    rows: Sequence[PromptRow],
    tokenizer: Any,
    config: RunConfig,
    *,
    teacher_prompts: bool = False,
) -> float | None:
    """Greedy exact-match accuracy of ``generator.complete`` on rows that carry an expected answer.

    ``teacher_prompts`` grades a teacher on the prompt it sees in training (its privileged one).
    """
    graded = [row for row in rows if row.expected_answer is not None]
    if not graded:
        return None
    prompts = [row.teacher_prompt_ids if teacher_prompts else row.prompt_ids for row in graded]
    completions = await generator.complete(prompts, max_new_tokens=_max_new_tokens(config))
    correct = sum(
        extract_answer(tokenizer.decode(ids, skip_special_tokens=True), config.eval.answer_pattern)
        == row.expected_answer.strip()
        for row, ids in zip(graded, completions, strict=True)
    )
    return correct / len(graded)


def _max_new_tokens(config: RunConfig) -> int:
    return config.eval.max_new_tokens or config.sampling.max_new_tokens


async def evaluate(
    sampler: Any,
    score: Any,
    rows: Sequence[PromptRow],
    tokenizer: Any,
    config: RunConfig,
) -> dict[str, float | None]:
    """Student accuracy (greedy) and mean per-token reverse KL to the teacher on sampled completions.

    ``score(rollouts)`` routes and scores like training does and returns (rollouts, scores). The
    reverse KL estimate is the mean of ``log π_student(y_t) − log π_teacher(y_t)`` over tokens
    sampled from the student with the run's sampling settings and a fixed seed.
    """
    result: dict[str, float | None] = {"accuracy": await accuracy(sampler, rows, tokenizer, config)}
    params = SamplingParams(
        max_new_tokens=_max_new_tokens(config),
        temperature=config.sampling.temperature,
        top_k=config.sampling.top_k,
        top_p=config.sampling.top_p,
        n=1,
    )
    rollouts = await sampler.sample(rows, params, seed=config.seed + EVAL_SEED_OFFSET)
    kept, scores = await score(rollouts)
    if kept:
        student = torch.cat([r.model_logprobs_C for r in kept])
        teacher = torch.cat([s.logprobs_C for s in scores])
        result["reverse_kl"] = float((student - teacher).mean())
    else:
        result["reverse_kl"] = None
    return result

