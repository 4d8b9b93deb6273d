"""Held-out evaluation: greedy exact-match accuracy and the sampled per-token reverse KL.

Both are reported overall and per route (the value of the row's route field), so a multi-teacher
run shows what the student learned from each teacher.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from distill import distributed
from distill.config import RunConfig
from distill.data import sample_seed
from distill.protocols import SkipRow
from distill.types import PromptRow

if TYPE_CHECKING:
    from distill.scoring import TeacherPool

__all__ = ["extract_answer", "grade", "accuracy", "evaluate", "teacher_accuracy", "EVAL_SEED_OFFSET"]

EVAL_SEED_OFFSET = 7_919  # eval sampling has its own seed: evaluating never moves training RNG

RouteOf = Callable[[PromptRow], str | None]
T = TypeVar("T")


def extract_answer(text: str, pattern: str | None) -> str | None:
    """The answer in a completion: the pattern's first group (or whole match), else the stripped text."""
    if pattern is None:
        return text.strip()
    match = re.search(pattern, text)
    if match is None:
        return None
    return (match.group(1) if match.groups() else match.group(0)).strip()


def _max_new_tokens(config: RunConfig) -> int:
    return config.eval.max_new_tokens or config.sampling.max_new_tokens


async def grade(
    generator: Any,
    rows: Sequence[PromptRow],
    tokenizer: Any,
    config: RunConfig,
    *,
    teacher_prompt_key: str | None = None,
) -> list[tuple[PromptRow, bool]]:
    """Greedy exact match of ``generator.complete`` on the rows that carry an expected answer.

    With ``teacher_prompt_key`` a teacher is graded on the prompt it sees in training (its
    privileged view of the row).
    """
    graded = [row for row in rows if row.expected_answer is not None]
    if not graded:
        return []
    prompts = [row.teacher_prompt_ids(teacher_prompt_key) if teacher_prompt_key else row.prompt_ids for row in graded]
    completions = await generator.complete(prompts, max_new_tokens=_max_new_tokens(config))
    return [
        (row, extract_answer(tokenizer.decode(ids, skip_special_tokens=True), config.eval.answer_pattern)
         == row.expected_answer.strip())
        for row, ids in zip(graded, completions, strict=True)
    ]


def _gathered(rows: Sequence[PromptRow], results: Sequence[tuple[PromptRow, T]]) -> list[tuple[PromptRow, T]]:
    """Every process's ``results`` for its share of ``rows``, on every process, in row order."""
    by_index = {row.index: row for row in rows}
    shares = distributed.gather([(row.index, value) for row, value in results])
    merged = sorted((pair for share in shares for pair in share), key=lambda pair: pair[0])
    return [(by_index[index], value) for index, value in merged]


def accuracy(results: Sequence[tuple[PromptRow, bool]]) -> float | None:
    return sum(ok for _, ok in results) / len(results) if results else None


async def evaluate(
    sampler: Any,
    score: Any,
    rows: Sequence[PromptRow],
    tokenizer: Any,
    config: RunConfig,
    route_of: RouteOf,
) -> dict[str, Any]:
    """Student accuracy (greedy) and mean per-token reverse KL to its teacher(s), overall and per route.

    ``score(rollouts)`` routes and scores like training does and returns (rollouts, targets). The
    reverse KL estimate is the mean of ``log π_student(y_t) − log π_teacher(y_t)`` over tokens
    sampled from the student with the run's sampling settings and a fixed seed.

    Under torchrun each process evaluates its share of the rows and every process gets the whole
    result (each row seeded by its position, so the split changes nothing).
    """
    share = distributed.my_share(rows)
    mine = [row for _, row in share]
    graded = _gathered(rows, await grade(sampler, mine, tokenizer, config))
    params = config.sampling.params(n=1, max_new_tokens=_max_new_tokens(config))
    seed = config.seed + EVAL_SEED_OFFSET
    rollouts = await sampler.sample(mine, params, seeds=[sample_seed(seed, position) for position, _ in share])
    kept, targets = await score(rollouts)
    gaps = _gathered(rows, [(r.row, r.model_logprobs_C - t.logprobs_C) for r, t in zip(kept, targets, strict=True)])

    def kl(selected: list[torch.Tensor]) -> float | None:
        return float(torch.cat(selected).mean()) if selected else None

    result: dict[str, Any] = {"accuracy": accuracy(graded), "reverse_kl": kl([g for _, g in gaps])}
    routes: dict[str, dict[str, list]] = defaultdict(lambda: {"graded": [], "gaps": []})
    for row, ok in graded:
        if (route := route_of(row)) is not None:
            routes[route]["graded"].append((row, ok))
    for row, gap in gaps:
        if (route := route_of(row)) is not None:
            routes[route]["gaps"].append(gap)
    if routes:
        result["per_route"] = {
            route: {"accuracy": accuracy(parts["graded"]), "reverse_kl": kl(parts["gaps"]),
                    "rows": len(parts["graded"])}
            for route, parts in sorted(routes.items())
        }
    return result


async def teacher_accuracy(
    pool: TeacherPool, rows: Sequence[PromptRow], tokenizer: Any, config: RunConfig
) -> dict[str, float | None]:
    """Each generating teacher's accuracy on the rows routed to it alone, seeing its own prompt
    (under torchrun, each process grades its share of the rows)."""
    by_teacher: dict[str, list[PromptRow]] = {}
    for _, row in distributed.my_share(rows):
        try:
            names = pool.router.route(row)
        except SkipRow:
            continue
        if len(names) == 1:
            by_teacher.setdefault(names[0], []).append(row)
    graded: dict[str, list[tuple[PromptRow, bool]]] = {}
    for name, routed in by_teacher.items():
        teacher = pool.teachers[name]
        if teacher.supports_complete:
            graded[name] = await grade(teacher, routed, tokenizer, config, teacher_prompt_key=pool.refs[name].prompt_key)
    # a process's share may route no row to a teacher: merge by name, not by position
    merged: dict[str, list[bool]] = {}
    for share in distributed.gather({name: [ok for _, ok in results] for name, results in graded.items()}):
        for name, oks in share.items():
            merged.setdefault(name, []).extend(oks)
    return {name: sum(oks) / len(oks) if oks else None for name, oks in merged.items()}
