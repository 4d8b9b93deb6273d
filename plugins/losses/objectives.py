"""The objectives, written exactly as the formulas in docs/concepts.md.

Both return the loss *summed* over tokens plus summed metrics; the trainer divides by the number
of active tokens in the whole step (or not, with ``loss.normalize = "sum"``).
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from distill import Objective, TokenBatch, finite, positive


__all__ = ["SampledReverseKLOptions", "SampledReverseKL", "TopKForwardKLOptions", "TopKForwardKL"]


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
