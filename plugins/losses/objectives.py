"""The objectives, written exactly as the formulas in docs/concepts.md.

Each returns the loss *summed* over tokens plus summed metrics; the trainer divides by the number
of active tokens in the whole step (or not, with ``loss.normalize = "sum"``). The sampled and top-K
objectives need the student's logprobs at a few ids per token; the full-vocabulary ones compare
both models' whole distributions through the kernel's ``divergence``.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from distill import LossKernel, Objective, TokenBatch, finite, positive

__all__ = [
    "SampledReverseKLOptions",
    "SampledReverseKL",
    "TopKForwardKLOptions",
    "TopKForwardKL",
    "FullVocabularyOptions",
    "GeneralizedJSDOptions",
    "FullVocabularyDivergence",
]


@attrs.frozen(kw_only=True)
class SampledReverseKLOptions:
    loss_scale: float = attrs.field(default=1.0, validator=finite)
    ratio_log_cap: float = attrs.field(default=20.0, validator=[positive, finite])
    baseline: Literal["sampling", "model"] = "sampling"


class SampledReverseKL(Objective):
    """``L = −Σ_t exp(clamp(lp_t − sampling_lp_t, −cap, cap)) · A_t``, ``A_t = s·(teacher_lp_t − baseline_t)``.

    At the sampling weights the ratio is 1 and the gradient is the per-token REINFORCE estimate of
    ∇ KL(student ‖ teacher). ``baseline = "model"`` uses the untempered model logprob, the exact
    reverse KL of the raw policy when sampling used a temperature or filters.
    """

    def __init__(self, options: SampledReverseKLOptions) -> None:
        self.options = options

    def target_ids(self, tokens: TokenBatch) -> torch.Tensor:
        return tokens.completion_ids_N.unsqueeze(1)

    def __call__(
        self, logprobs_N_K: torch.Tensor, tokens: TokenBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        opts = self.options
        logprobs_N = logprobs_N_K[:, 0]
        sampling_N = tokens.sampling_logprobs_N.to(logprobs_N.dtype)
        baseline_N = sampling_N if opts.baseline == "sampling" else tokens.model_logprobs_N
        advantage_N = opts.loss_scale * (tokens.teacher_logprobs_N.to(logprobs_N.dtype) - baseline_N)
        log_ratio_N = logprobs_N - sampling_N
        ratio_N = torch.exp(log_ratio_N.clamp(-opts.ratio_log_cap, opts.ratio_log_cap))
        loss = -(ratio_N * advantage_N).sum()
        with torch.no_grad():
            metrics = {
                "advantage": advantage_N.sum(),
                "importance_ratio": ratio_N.sum(),
                "ratio_clamped_fraction": (log_ratio_N.abs() > opts.ratio_log_cap).sum().to(logprobs_N.dtype),
            }
        return loss, metrics


@attrs.frozen(kw_only=True)
class TopKForwardKLOptions:
    top_k: int = attrs.field(default=8, validator=positive)


class TopKForwardKL(Objective):
    """``L = −Σ_t Σ_j q_tj · log π(k_tj)``, ``q_t = softmax(teacher top-K logprobs)`` (renormalised)."""

    def __init__(self, options: TopKForwardKLOptions) -> None:
        self.options = options

    def target_ids(self, tokens: TokenBatch) -> torch.Tensor:
        return tokens.teacher_topk_ids_N_K

    def __call__(
        self, logprobs_N_K: torch.Tensor, tokens: TokenBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher_N_K = tokens.teacher_topk_logprobs_N_K.to(logprobs_N_K.dtype)
        targets_N_K = torch.softmax(teacher_N_K, dim=-1)
        loss = -(targets_N_K * logprobs_N_K).sum()
        with torch.no_grad():
            metrics = {
                "teacher_topk_mass": torch.logsumexp(teacher_N_K, dim=-1).exp().sum(),
                "student_topk_mass": torch.logsumexp(logprobs_N_K, dim=-1).exp().sum(),
            }
        return loss, metrics


@attrs.frozen(kw_only=True)
class FullVocabularyOptions:
    """``temperature`` divides both models' logits before the divergence (TRL's and GKD's)."""

    temperature: float = attrs.field(default=1.0, validator=[finite, positive])


def _in_closed_unit_interval(_inst: object, _attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1], got {value!r}")


@attrs.frozen(kw_only=True)
class GeneralizedJSDOptions(FullVocabularyOptions):
    """``beta`` interpolates: 0 is forward KL(teacher ‖ student), 1 reverse KL(student ‖ teacher)."""

    beta: float = attrs.field(default=0.5, validator=_in_closed_unit_interval)


class FullVocabularyDivergence(Objective):
    """``L = Σ_t D_β(p_student(·|x_<t) ‖ p_teacher(·|x_<t))`` over the whole vocabulary at every
    completion position, TRL's generalised JSD (``β = 1`` reverse KL, ``β = 0`` forward KL).

    The exact per-position divergence, not a sampled estimate: no importance ratio, since no
    sampled token enters the loss. Tokens scored by different teachers (routed MOPD) are grouped
    by the teacher's head.
    """

    def __init__(self, *, beta: float, temperature: float) -> None:
        self.beta = beta
        self.temperature = temperature

    def loss(
        self, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, kernel: LossKernel, tokens: TokenBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher_hidden_N_G, head_N = tokens.teacher_hidden_N_G, tokens.teacher_head_N
        total = hidden_N_H.new_zeros((), dtype=torch.promote_types(hidden_N_H.dtype, torch.float32))
        for index, head_V_G in enumerate(tokens.teacher_heads):
            rows = (head_N == index).nonzero().squeeze(1).to(hidden_N_H.device)
            if rows.numel() == 0:
                continue
            vocab = min(weight_V_H.shape[0], head_V_G.shape[0])  # a padded head's extra rows are no tokens
            divergence_R = kernel.divergence(
                hidden_N_H[rows], weight_V_H[:vocab], teacher_hidden_N_G[rows].to(hidden_N_H.device),
                head_V_G[:vocab].to(hidden_N_H.device), beta=self.beta, temperature=self.temperature,
            )
            total = total + divergence_R.sum()
        return total, {"divergence": total.detach()}
