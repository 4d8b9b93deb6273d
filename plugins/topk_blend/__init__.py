"""Built-in plugin ``topk_blend``: several teachers' top-K merged by probability union.

Per position, each teacher's top-K logprobs are renormalised into a distribution over its K ids,
weighted by its normalised ``blend_weight``; mass is summed over the union of ids, the K ids with
the most mass are kept (ties go to the lower id) and renormalised. The sampled token's blended
logprob is the log of the weighted mixture of the teachers' probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distill import (
    Blender,
    BlenderSpec,
    BuildContext,
    DistillError,
    NoOptions,
    TeacherScores,
    WeightedScores,
    hookimpl,
)

__all__ = ["BlendError", "ProbabilityUnion"]


class BlendError(DistillError):
    """A teacher's scores cannot be blended (missing or too few top-K candidates)."""


def _validated_topk(teacher: WeightedScores, top_k: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, logprobs = teacher.scores.topk_ids_C_K, teacher.scores.topk_logprobs_C_K
    if ids is None or logprobs is None:
        raise BlendError(f"teacher '{teacher.teacher}' returned no top-K candidates ({where})")
    valid_C_K = (ids >= 0) & torch.isfinite(logprobs)
    if ids.shape[1] < top_k:
        valid_C_K = torch.zeros((ids.shape[0], top_k), dtype=torch.bool)
        valid_C_K[:, : ids.shape[1]] = (ids >= 0) & torch.isfinite(logprobs)
    short = (valid_C_K[:, :top_k].sum(dim=1) < top_k).nonzero()
    if len(short):
        position = int(short[0])
        found = int(valid_C_K[position, :top_k].sum())
        raise BlendError(
            f"teacher '{teacher.teacher}' returned {found} top-K candidates at completion position "
            f"{position} ({where}), fewer than top_k = {top_k}; lower loss.top_k or fix the teacher"
        )
    return ids[:, :top_k], logprobs[:, :top_k]


class ProbabilityUnion(Blender):
    """Weighted probability union of renormalised top-K distributions, cut back to K."""

    @classmethod
    def build(cls, options: NoOptions, context: BuildContext) -> ProbabilityUnion:
        return cls()

    def blend(self, teachers: Sequence[WeightedScores], *, top_k: int, where: str = "") -> TeacherScores:
        total = sum(t.weight for t in teachers)
        if not teachers or total <= 0:
            raise BlendError(f"nothing to blend: no teacher with a positive weight ({where})")
        ids, masses, sampled = [], [], []
        for teacher in teachers:
            ids_C_K, logprobs_C_K = _validated_topk(teacher, top_k, where)
            share = teacher.weight / total
            ids.append(ids_C_K.long())
            masses.append(share * torch.softmax(logprobs_C_K.double(), dim=-1))
            sampled.append(teacher.scores.logprobs_C.double() + torch.log(torch.tensor(share, dtype=torch.float64)))
        ids_C_M, mass_C_M = torch.cat(ids, dim=1), torch.cat(masses, dim=1)

        # sum the mass of equal ids: sort by id, then add up each run of equal ids
        sorted_ids_C_M, order = torch.sort(ids_C_M, dim=1)
        sorted_mass_C_M = mass_C_M.gather(1, order)
        starts = torch.ones_like(sorted_ids_C_M, dtype=torch.bool)
        starts[:, 1:] = sorted_ids_C_M[:, 1:] != sorted_ids_C_M[:, :-1]
        segment_C_M = starts.cumsum(dim=1) - 1
        union_mass_C_M = torch.zeros_like(sorted_mass_C_M).scatter_add_(1, segment_C_M, sorted_mass_C_M)
        union_ids_C_M = torch.full_like(sorted_ids_C_M, -1).scatter_(1, segment_C_M, sorted_ids_C_M)

        # keep the K heaviest; a stable sort over ascending ids breaks ties towards the lower id
        _, keep = torch.sort(union_mass_C_M, dim=1, descending=True, stable=True)
        keep_C_K = keep[:, :top_k]
        kept_mass_C_K = union_mass_C_M.gather(1, keep_C_K)
        kept_mass_C_K = kept_mass_C_K / kept_mass_C_K.sum(dim=1, keepdim=True)
        return TeacherScores(
            logprobs_C=torch.logsumexp(torch.stack(sampled), dim=0).float(),
            topk_ids_C_K=union_ids_C_M.gather(1, keep_C_K),
            topk_logprobs_C_K=kept_mass_C_K.log().float(),
        )


@hookimpl
def distill_blenders() -> list[BlenderSpec]:
    return [
        BlenderSpec(
            name="probability_union",
            summary="Weighted union of renormalised top-K distributions, cut back to the top K.",
            factory=ProbabilityUnion.build,
        )
    ]
