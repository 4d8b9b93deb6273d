"""Teacher scoring for a step: route rows, score concurrently, blend, and keep per-teacher books.

Each teacher sees its own prompt for a row (``teacher_messages_key``: privileged context) followed
by exactly the student's completion tokens. Teachers score concurrently, so a slow one does not
idle the others. Rows a router skips are counted by reason; rows sent to several teachers are
blended into one top-K target.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from distill.align import AlignmentError, check_length
from distill.protocols import Blender, Router, SkipRow, TeacherScorer
from distill.types import Rollout, ScoreFailure, ScoreRequest, TeacherRef, TeacherScores, WeightedScores

__all__ = ["TeacherBook", "TeacherPool"]


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
    hidden: bool = False  # full-vocabulary losses: teachers return hidden states and their head
    totals: dict[str, TeacherBook] = attrs.field(factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {name: attrs.asdict(book) for name, book in self.totals.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.totals = {name: TeacherBook(**book) for name, book in state.items()}

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
        scored = []
        for i, scores in zip(indices, results, strict=True):
            if isinstance(scores, ScoreFailure):
                book.failed += 1
                continue
            scored.append(i)
            rollout = rollouts[i]
            check_length(rollout, scores, f"teacher '{name}'")
            book.reverse_kl_sum += float((rollout.model_logprobs_C - scores.logprobs_C).sum())
        book.requests += len(requests)
        book.rows += len({rollouts[i].row.index for i in scored})
        book.tokens += sum(rollouts[i].completion_ids_C.shape[0] for i in scored)
        return results

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
