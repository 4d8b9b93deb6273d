"""Built-in plugin ``losses``: the distillation objectives and the reference kernel.

``sampled_reverse_kl`` (OPD) trains on teacher − student logprob advantages with a clamped
importance ratio; ``topk_forward_kl`` (SDFT) is a cross-entropy on the teacher's renormalised
top-K. With a local teacher the whole vocabulary is available: ``full_reverse_kl``,
``full_forward_kl`` and ``generalized_jsd`` compare both distributions at every completion position.
The reference kernel builds fp32 logits; it is ``trylast`` so fused kernels win "auto".
"""

from __future__ import annotations

import structlog

from distill import BuildContext, LossSpec, hookimpl
from distill.plugins.losses.objectives import (
    FullVocabularyDivergence,
    FullVocabularyOptions,
    GeneralizedJSDOptions,
    SampledReverseKL,
    SampledReverseKLOptions,
    TopKForwardKL,
    TopKForwardKLOptions,
)
from distill.plugins.losses.reference import REFERENCE_KERNEL

__all__ = ["SampledReverseKL", "TopKForwardKL", "FullVocabularyDivergence", "REFERENCE_KERNEL"]


def _sampled_reverse_kl(options: SampledReverseKLOptions, context: BuildContext) -> SampledReverseKL:
    if context.run_config.train.max_staleness:
        structlog.get_logger("distill").warning(
            "sampled_reverse_kl with train.max_staleness = 1: on the arithmetic demo at lr 6e-4 this "
            "diverged (0.5% held out against 88% strict, see docs/concepts.md#pipelined-steps); "
            "pipeline a full-vocabulary loss, or lower the learning rate")
    return SampledReverseKL(options)


@hookimpl
def distill_losses() -> list[LossSpec]:
    return [
        LossSpec(
            name="sampled_reverse_kl",
            summary="On-policy reverse KL: importance-sampled teacher-minus-student advantages.",
            teacher_signal="logprobs",
            config_cls=SampledReverseKLOptions,
            factory=_sampled_reverse_kl,
        ),
        LossSpec(
            name="topk_forward_kl",
            summary="Cross-entropy on the teacher's renormalised top-K (forward KL up to a constant).",
            teacher_signal="topk",
            config_cls=TopKForwardKLOptions,
            factory=lambda options, context: TopKForwardKL(options),
            top_k=lambda options: options.top_k,
        ),
        *(
            LossSpec(
                name=f"full_{direction}_kl",
                summary=f"Exact {direction} KL({divergence}) over the whole vocabulary (a local teacher).",
                teacher_signal="hidden",
                config_cls=FullVocabularyOptions,
                factory=lambda options, context, beta=beta: FullVocabularyDivergence(
                    beta=beta, temperature=options.temperature),
            )
            for direction, divergence, beta in (("reverse", "student ‖ teacher", 1.0),
                                                ("forward", "teacher ‖ student", 0.0))
        ),
        LossSpec(
            name="generalized_jsd",
            summary="TRL's generalised JSD over the whole vocabulary: beta 0 forward KL, 1 reverse KL.",
            teacher_signal="hidden",
            config_cls=GeneralizedJSDOptions,
            factory=lambda options, context: FullVocabularyDivergence(beta=options.beta,
                                                                      temperature=options.temperature),
        ),
    ]


@hookimpl(trylast=True)
def distill_select_loss_kernel(loss: str, kernel: str, device: str, dtype: str):
    if kernel in ("auto", REFERENCE_KERNEL.name):
        return REFERENCE_KERNEL
    return None
