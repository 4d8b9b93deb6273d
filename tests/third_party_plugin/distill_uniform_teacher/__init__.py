"""A custom teacher backend, packaged the way third parties ship one.

The tests install this package and run distill with it: it must be discovered through the
``distill.plugins`` entry-point group and used like any built-in teacher.
"""

from __future__ import annotations

import math

import attrs
import torch

from distill import ScoreRequest, TeacherScorer, TeacherScores, TeacherSpec, hookimpl


@attrs.frozen(kw_only=True)
class UniformOptions:
    vocab_size: int


class UniformTeacher(TeacherScorer):
    """Every token has probability 1/V; top-K are the K lowest ids."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    async def score(self, requests: list[ScoreRequest], *, top_k: int) -> list[TeacherScores]:
        logprob = -math.log(self.vocab_size)
        results = []
        for request in requests:
            C = len(request.completion_ids)
            results.append(TeacherScores(
                logprobs_C=torch.full((C,), logprob),
                topk_ids_C_K=torch.arange(top_k).repeat(C, 1) if top_k else None,
                topk_logprobs_C_K=torch.full((C, top_k), logprob) if top_k else None,
            ))
        return results


@hookimpl
def distill_teachers():
    return [TeacherSpec(
        name="uniform",
        summary="Uniform over the vocabulary (a teacher that knows nothing).",
        config_cls=UniformOptions,
        factory=lambda options, context: UniformTeacher(options.vocab_size),
    )]
