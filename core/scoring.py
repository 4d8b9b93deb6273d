"""Teacher scoring for a step: route rows, score concurrently, blend, and keep per-teacher books.

Each teacher sees its own prompt for a row (``teacher_messages_key``: privileged context) followed
by exactly the student's completion tokens. Teachers score concurrently, so a slow one does not
idle the others. Rows a router skips are counted by reason; rows sent to several teachers are
blended into one top-K target. Every result is checked before use (:func:`scores_problem`): a
teacher that breaks the contract stops the run naming itself, the rule and the dataset line,
instead of training on garbage or crashing in a kernel.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch

from distill.align import AlignmentError
from distill.errors import PluginError
from distill.protocols import Blender, Router, SkipRow, TeacherScorer
from distill.types import Rollout, ScoreFailure, ScoreRequest, TeacherRef, TeacherScores, WeightedScores

__all__ = ["TeacherBook", "TeacherPool", "scores_problem", "LOGPROB_SLACK"]

LOGPROB_SLACK = 1e-4  # rounding: a logprob a hair above 0, top-K probabilities a hair above 1


def _tensor_problem(value: Any, name: str, shape: tuple[int, ...], *, ids: bool = False) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"{name} must be a torch.Tensor, got {type(value).__name__}"
    if ids and value.dtype != torch.long:
        return f"{name} must be torch.long vocabulary ids, got {value.dtype}"
    if not ids and not value.is_floating_point():
        return f"{name} must be floating point log-probabilities, got {value.dtype}"
    if not value.is_cpu:
        return f"{name} must be on the CPU, got {value.device}"
    if value.shape != shape:
        return f"{name} must have shape {list(shape)}, one entry per completion token, got {list(value.shape)}"
    return None


def _shape_problem(scores: Any, length: int, top_k: int, hidden: bool) -> str | None:
    if not isinstance(scores, TeacherScores):
        return f"results must be TeacherScores or ScoreFailure, got {type(scores).__name__}"
    problem = _tensor_problem(scores.logprobs_C, "logprobs_C", (length,))
    if problem is None and top_k:
        problem = (_tensor_problem(scores.topk_ids_C_K, "topk_ids_C_K", (length, top_k), ids=True)
                   or _tensor_problem(scores.topk_logprobs_C_K, "topk_logprobs_C_K", (length, top_k)))
    if problem is None and hidden:
        states, head = scores.hidden_C_G, scores.head_V_G
        if not isinstance(states, torch.Tensor) or states.dim() != 2 or states.shape[0] != length:
            return f"with hidden=True, hidden_C_G must be a [{length}, G] tensor"
        # the head's row count may differ from the student's: heads are often padded past the vocabulary
        if not isinstance(head, torch.Tensor) or head.dim() != 2 or head.shape[1] != states.shape[1]:
            return f"with hidden=True, head_V_G must be the [V, {states.shape[1]}] output head"
    return problem


def scores_problem(
    scores: Sequence[TeacherScores], lengths: Sequence[int], *, top_k: int, vocab_size: int | None = None,
    hidden: bool = False,
) -> tuple[int, int | None, str] | None:
    """The first rule of the teacher contract that ``scores`` break, as (result index, completion
    position or None, rule), or None when they keep it.

    Types, devices and shapes are read per result; values are checked once over the whole batch
    (the results concatenated), so the check stays a small fraction of scoring. ``vocab_size``,
    when known, bounds the top-K ids.
    """
    for i, (result, length) in enumerate(zip(scores, lengths, strict=True)):
        if (problem := _shape_problem(result, length, top_k, hidden)) is not None:
            return i, None, problem
    if not scores:
        return None
    # Values are checked in numpy on the concatenated batch: the arrays are small, and numpy wakes no
    # intra-op thread pool, which on a busy machine costs far more than the arithmetic.
    logprobs_N = torch.cat([s.logprobs_C for s in scores]).float().numpy(force=True)
    rules = {"logprobs_C must be finite log-probabilities (≤ 0)":
             ~((logprobs_N <= LOGPROB_SLACK) & (logprobs_N > -np.inf))}
    if top_k:
        ids_N_K = np.sort(torch.cat([s.topk_ids_C_K for s in scores]).numpy(), axis=1)
        top_N_K = torch.cat([s.topk_logprobs_C_K for s in scores]).float().numpy(force=True)
        outside = ids_N_K[:, 0] < 0
        if vocab_size is not None:
            outside |= ids_N_K[:, -1] >= vocab_size
        rules[f"topk_ids_C_K must be vocabulary ids in [0, {vocab_size or 'V'})"] = outside
        rules["top-K candidate ids must be distinct within a position"] = (ids_N_K[:, 1:] == ids_N_K[:, :-1]).any(1)
        rules["topk_logprobs_C_K must be finite log-probabilities (≤ 0)"] = ~(
            (top_N_K <= LOGPROB_SLACK) & (top_N_K > -np.inf)).all(1)
        with np.errstate(over="ignore"):  # a positive logprob overflowing is caught by the rule before
            rules["top-K probabilities must not sum above 1"] = np.exp(top_N_K).sum(1) > 1 + LOGPROB_SLACK
    for rule, bad_N in rules.items():
        if bad_N.any():
            flat = int(np.flatnonzero(bad_N)[0])
            ends = np.cumsum(lengths)  # where each result's positions end in the concatenation
            i = int(np.searchsorted(ends, flat, side="right"))
            return i, flat - (int(ends[i - 1]) if i else 0), rule
    return None


@attrs.define
class TeacherBook:
    """What one teacher did: rows and tokens scored, requests in flight, its reverse KL to the student."""

    rows: int = 0
    requests: int = 0
    tokens: int = 0
    reverse_kl_sum: float = 0.0
    failed: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0

    def add(self, other: TeacherBook) -> None:
        self.failed += other.failed
        self.rows += other.rows
        self.requests += other.requests
        self.tokens += other.tokens
        self.reverse_kl_sum += other.reverse_kl_sum
        self.peak_in_flight = max(self.peak_in_flight, other.peak_in_flight)

    @property
    def reverse_kl(self) -> float | None:
        return self.reverse_kl_sum / self.tokens if self.tokens else None

    def as_dict(self) -> dict[str, Any]:
        return {"rows_scored": self.rows, "requests": self.requests, "tokens_scored": self.tokens,
                "reverse_kl": self.reverse_kl, "failed": self.failed, "peak_in_flight": self.peak_in_flight}


@attrs.define
class TeacherPool:
    """The run's teachers by name, how each reads a row (``refs``), and how rows reach them.

    ``totals`` are the run's books per teacher, kept across resumes (:meth:`state_dict`).
    """

    teachers: Mapping[str, TeacherScorer]
    refs: Mapping[str, TeacherRef]
    router: Router
    blender: Blender | None
    top_k: int
    vocab_size: int  # the student's: top-K ids must index its head
    hidden: bool = False  # full-vocabulary losses: teachers return hidden states and their head
    totals: dict[str, TeacherBook] = attrs.field(factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """The run's books and each teacher's own state (a remote teacher's counters), by name."""
        return {"books": {name: attrs.asdict(book) for name, book in self.totals.items()},
                "teachers": {name: teacher.state_dict() for name, teacher in self.teachers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.totals = {name: TeacherBook(**book) for name, book in state["books"].items()}
        for name, teacher_state in state["teachers"].items():
            if name in self.teachers:  # teachers sharing an instance load the same state: harmless
                self.teachers[name].load_state_dict(teacher_state)

    async def _score_one_teacher(
        self, name: str, rollouts: Sequence[Rollout], indices: list[int], book: TeacherBook, hidden: bool
    ) -> list[TeacherScores | ScoreFailure]:
        requests = [
            ScoreRequest(
                prompt_ids=rollouts[i].row.teacher_prompt_ids(self.refs[name].prompt_key),
                completion_ids=tuple(rollouts[i].completion_ids_C.tolist()),
            )
            for i in indices
        ]
        book.in_flight += len(requests)
        book.peak_in_flight = max(book.peak_in_flight, book.in_flight)
        try:
            signal = {"hidden": True} if hidden else {}  # asked only of teachers that declare it
            results = await self.teachers[name].score(requests, top_k=self.top_k, **signal)
        finally:
            book.in_flight -= len(requests)
        if len(results) != len(requests):
            raise AlignmentError(f"teacher '{name}' returned {len(results)} scores for {len(requests)} requests")
        scored = [(i, s) for i, s in zip(indices, results, strict=True) if not isinstance(s, ScoreFailure)]
        self._check(name, [rollouts[i] for i, _ in scored], [s for _, s in scored], hidden)
        for i, scores in scored:
            book.reverse_kl_sum += float((rollouts[i].model_logprobs_C - scores.logprobs_C).sum())
        book.failed += len(indices) - len(scored)
        book.requests += len(requests)
        book.rows += len({rollouts[i].row.index for i, _ in scored})
        book.tokens += sum(rollouts[i].completion_ids_C.shape[0] for i, _ in scored)
        return results

    def _check(self, name: str, rollouts: list[Rollout], scores: list[TeacherScores], hidden: bool) -> None:
        lengths = [r.completion_ids_C.shape[0] for r in rollouts]
        found = scores_problem(scores, lengths, top_k=self.top_k, vocab_size=self.vocab_size, hidden=hidden)
        if found is not None:
            i, position, rule = found
            ref = self.refs[name]
            at = "" if position is None else f", completion position {position}"
            raise PluginError(
                f"teacher '{name}' ({ref.path}, backend '{ref.backend}') broke the scoring contract on dataset "
                f"line {rollouts[i].row.index}{at}: {rule}. Fix the backend; distill.testing.check_teacher "
                f"checks these rules in its own tests."
            )

    def record(self, books: Mapping[str, TeacherBook]) -> None:
        """Add one call's books to the run totals."""
        for name, book in books.items():
            self.totals.setdefault(name, TeacherBook()).add(book)

    async def score(
        self, rollouts: Sequence[Rollout], skipped: Counter[str] | None = None, *, hidden: bool | None = None
    ) -> tuple[list[Rollout], list[TeacherScores], dict[str, TeacherBook]]:
        """Route and score ``rollouts``; return the scored ones, their targets and this call's books
        (:meth:`record` adds them to the run's totals).

        A row the router skips is counted once in ``skipped`` (by reason) and dropped; a completion
        a teacher failed to score is dropped and counted as ``teacher_failed:<reason>``. ``hidden``
        (default: whether the loss needs them) asks teachers for hidden states; evaluation does not.
        """
        skipped = Counter() if skipped is None else skipped
        routed: dict[int, tuple[str, ...]] = {}
        skipped_rows: set[int] = set()
        for i, rollout in enumerate(rollouts):
            try:
                routed[i] = tuple(self.router.route(rollout.row))
            except SkipRow as skip:
                if rollout.row.index not in skipped_rows:
                    skipped_rows.add(rollout.row.index)
                    skipped[skip.reason] += 1
        by_teacher: dict[str, list[int]] = {}
        for i, names in routed.items():
            for name in names:
                by_teacher.setdefault(name, []).append(i)

        books = {name: TeacherBook() for name in by_teacher}
        results = await asyncio.gather(
            *(self._score_one_teacher(name, rollouts, idx, books[name], self.hidden if hidden is None else hidden)
              for name, idx in by_teacher.items())
        )
        per_rollout: dict[int, dict[str, TeacherScores]] = {i: {} for i in routed}
        failed: dict[int, str] = {}
        for (name, indices), scores in zip(by_teacher.items(), results, strict=True):
            for i, score in zip(indices, scores, strict=True):
                if isinstance(score, ScoreFailure):
                    failed.setdefault(i, f"teacher_failed:{score.reason}")
                else:
                    per_rollout[i][name] = score
        for reason in failed.values():  # a dropped completion is counted, never trained on
            skipped[reason] += 1

        kept, targets = [], []
        for i in sorted(set(routed) - set(failed)):
            names = routed[i]
            if len(names) == 1:
                target = per_rollout[i][names[0]]
            else:
                target = self.blender.blend(
                    [WeightedScores(name, self.refs[name].blend_weight, per_rollout[i][name]) for name in names],
                    top_k=self.top_k,
                    where=f"dataset line {rollouts[i].row.index}",
                )
            kept.append(rollouts[i])
            targets.append(target)
        return kept, targets, books
