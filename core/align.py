"""Token alignment: where each completion token's logprob lives, for the student and the teachers.

A sequence is ``prompt (P tokens) + completion (C tokens)``. The model reads ``x[:-1]`` and predicts
``x[1:]``, so completion token ``j`` is predicted at input position ``P - 1 + j``: positions
``P-1 … P+C-2``. A teacher scores its own prompt (T tokens) + the same completion, so its
completion logprobs sit at ``T-1 … T+C-2``: only the prompt length differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from distill.errors import DistillError
from distill.types import Rollout, TeacherScores

__all__ = ["completion_positions", "TokenBatch", "build_token_batch", "check_length", "AlignmentError"]


class AlignmentError(DistillError):
    """A teacher returned scores that do not line up with the completion they score."""


def completion_positions(prompt_len: int, completion_len: int) -> slice:
    """Input positions whose next-token prediction is a completion token: ``P-1 … P+C-2``."""
    if prompt_len < 1:
        raise ValueError("a prompt needs at least one token to condition the first completion token")
    return slice(prompt_len - 1, prompt_len + completion_len - 1)


@attrs.frozen(kw_only=True, eq=False)
class TokenBatch:
    """Everything a step's loss needs, padded per sequence ([B, L] inputs, [B, C] per-token data).

    ``positions_B_C`` index into the L input positions (``P-1+j``), ``mask_B_C`` marks real
    completion tokens. The ``*_N`` properties flatten the masked tokens in row-major order, the
    order in which the trainer gathers hidden states. For full-vocabulary losses,
    ``teacher_hidden_B_C_G`` holds the teachers' hidden states and
    ``teacher_heads[teacher_head_B[b]]`` the head that scored row ``b`` (routed teachers differ).
    """

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor
    positions_B_C: torch.Tensor
    mask_B_C: torch.Tensor
    completion_ids_B_C: torch.Tensor
    sampling_logprobs_B_C: torch.Tensor
    model_logprobs_B_C: torch.Tensor
    teacher_logprobs_B_C: torch.Tensor | None = None
    teacher_topk_ids_B_C_K: torch.Tensor | None = None
    teacher_topk_logprobs_B_C_K: torch.Tensor | None = None
    teacher_hidden_B_C_G: torch.Tensor | None = None
    teacher_head_B: torch.Tensor | None = None
    teacher_heads: tuple[torch.Tensor, ...] = ()

    @property
    def num_sequences(self) -> int:
        return self.input_ids_B_L.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.mask_B_C.sum())

    def _flat(self, tensor: torch.Tensor | None) -> torch.Tensor:
        if tensor is None:
            raise AlignmentError("this batch carries no such teacher signal")
        return tensor[self.mask_B_C]

    @property
    def completion_ids_N(self) -> torch.Tensor:
        return self._flat(self.completion_ids_B_C)

    @property
    def sampling_logprobs_N(self) -> torch.Tensor:
        return self._flat(self.sampling_logprobs_B_C)

    @property
    def model_logprobs_N(self) -> torch.Tensor:
        return self._flat(self.model_logprobs_B_C)

    @property
    def teacher_logprobs_N(self) -> torch.Tensor:
        return self._flat(self.teacher_logprobs_B_C)

    @property
    def teacher_topk_ids_N_K(self) -> torch.Tensor:
        return self._flat(self.teacher_topk_ids_B_C_K)

    @property
    def teacher_topk_logprobs_N_K(self) -> torch.Tensor:
        return self._flat(self.teacher_topk_logprobs_B_C_K)

    @property
    def teacher_hidden_N_G(self) -> torch.Tensor:
        return self._flat(self.teacher_hidden_B_C_G)

    @property
    def teacher_head_N(self) -> torch.Tensor:
        """Per token, the index in ``teacher_heads`` of the head that scores it."""
        return self._flat(self.teacher_head_B[:, None].expand_as(self.mask_B_C))

    def select(self, start: int, stop: int) -> TokenBatch:
        """Sequences ``start:stop``, inputs trimmed to their longest sequence."""
        mask = self.attention_mask_B_L[start:stop]
        length = int(mask.sum(dim=1).max())
        width = int(self.mask_B_C[start:stop].sum(dim=1).max())

        def cut(t: torch.Tensor | None, cols: int) -> torch.Tensor | None:
            return None if t is None else t[start:stop, :cols]

        return TokenBatch(
            input_ids_B_L=cut(self.input_ids_B_L, length),
            attention_mask_B_L=cut(self.attention_mask_B_L, length),
            positions_B_C=cut(self.positions_B_C, width),
            mask_B_C=cut(self.mask_B_C, width),
            completion_ids_B_C=cut(self.completion_ids_B_C, width),
            sampling_logprobs_B_C=cut(self.sampling_logprobs_B_C, width),
            model_logprobs_B_C=cut(self.model_logprobs_B_C, width),
            teacher_logprobs_B_C=cut(self.teacher_logprobs_B_C, width),
            teacher_topk_ids_B_C_K=cut(self.teacher_topk_ids_B_C_K, width),
            teacher_topk_logprobs_B_C_K=cut(self.teacher_topk_logprobs_B_C_K, width),
            teacher_hidden_B_C_G=cut(self.teacher_hidden_B_C_G, width),
            teacher_head_B=None if self.teacher_head_B is None else self.teacher_head_B[start:stop],
            teacher_heads=self.teacher_heads,
        )


def check_length(rollout: Rollout, scores: TeacherScores, who: str = "teacher") -> None:
    """Scores must have one entry per completion token, or a run would train on misaligned targets."""
    length = rollout.completion_ids_C.shape[0]
    where = f"a completion of {length} tokens (dataset line {rollout.row.index})"
    if scores.logprobs_C.shape != (length,):
        raise AlignmentError(f"{who} returned {tuple(scores.logprobs_C.shape)} logprobs for {where}")
    if scores.topk_ids_C_K is not None and scores.topk_ids_C_K.shape[0] != length:
        raise AlignmentError(f"{who} returned top-K for {scores.topk_ids_C_K.shape[0]} positions of {where}")


def build_token_batch(
    rollouts: Sequence[Rollout], scores: Sequence[TeacherScores], *, pad_id: int
) -> TokenBatch:
    """Pad rollouts and their teacher scores into one :class:`TokenBatch`."""
    if len(rollouts) != len(scores):
        raise AlignmentError(f"{len(scores)} teacher scores for {len(rollouts)} rollouts")
    for rollout, score in zip(rollouts, scores, strict=True):
        check_length(rollout, score)
    B = len(rollouts)
    lengths = [len(r.prompt_ids) + r.completion_ids_C.shape[0] - 1 for r in rollouts]
    L = max(lengths)
    C = max(r.completion_ids_C.shape[0] for r in rollouts)
    has_topk = scores[0].topk_ids_C_K is not None
    K = scores[0].topk_ids_C_K.shape[1] if has_topk else 0

    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    positions = torch.zeros((B, C), dtype=torch.long)
    mask = torch.zeros((B, C), dtype=torch.bool)
    completion = torch.full((B, C), pad_id, dtype=torch.long)
    sampling = torch.zeros((B, C))
    model = torch.zeros((B, C))
    teacher = torch.zeros((B, C))
    topk_ids = torch.zeros((B, C, K), dtype=torch.long) if has_topk else None
    topk_lps = torch.zeros((B, C, K)) if has_topk else None
    first_hidden = scores[0].hidden_C_G
    hidden = None if first_hidden is None else first_hidden.new_zeros((B, C, first_hidden.shape[1]))
    heads: dict[int, torch.Tensor] = {}  # the teachers' heads by identity, in first-seen order
    head_of = torch.zeros(B, dtype=torch.long)
    for b, (rollout, score) in enumerate(zip(rollouts, scores, strict=True)):
        prompt = torch.tensor(rollout.prompt_ids, dtype=torch.long)
        c = rollout.completion_ids_C.shape[0]
        sequence = torch.cat([prompt, rollout.completion_ids_C.long()])[:-1]
        input_ids[b, : sequence.shape[0]] = sequence
        attention[b, : sequence.shape[0]] = 1
        span = completion_positions(prompt.shape[0], c)
        positions[b, :c] = torch.arange(span.start, span.stop)
        mask[b, :c] = True
        completion[b, :c] = rollout.completion_ids_C
        sampling[b, :c] = rollout.sampling_logprobs_C
        model[b, :c] = rollout.model_logprobs_C
        teacher[b, :c] = score.logprobs_C
        if has_topk:
            if score.topk_ids_C_K is None or score.topk_ids_C_K.shape[1] != K:
                raise AlignmentError(f"teachers returned different top-K widths (rollout {b})")
            topk_ids[b, :c] = score.topk_ids_C_K
            topk_lps[b, :c] = score.topk_logprobs_C_K
        if hidden is not None:
            if score.hidden_C_G is None or score.head_V_G is None:
                raise AlignmentError(f"a teacher returned no hidden states (rollout {b}, dataset line {rollout.row.index})")
            hidden[b, :c] = score.hidden_C_G
            heads.setdefault(id(score.head_V_G), score.head_V_G)
            head_of[b] = list(heads).index(id(score.head_V_G))
    return TokenBatch(
        input_ids_B_L=input_ids,
        attention_mask_B_L=attention,
        positions_B_C=positions,
        mask_B_C=mask,
        completion_ids_B_C=completion,
        sampling_logprobs_B_C=sampling,
        model_logprobs_B_C=model,
        teacher_logprobs_B_C=teacher,
        teacher_topk_ids_B_C_K=topk_ids,
        teacher_topk_logprobs_B_C_K=topk_lps,
        teacher_hidden_B_C_G=hidden,
        teacher_head_B=head_of if hidden is not None else None,
        teacher_heads=tuple(heads.values()),
    )
