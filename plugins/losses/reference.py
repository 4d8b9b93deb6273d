"""The reference kernels: full logits, then a gather or a divergence. Simple, exact, memory-hungry."""

from __future__ import annotations

import math

import torch

from distill import full_logprobs

__all__ = ["ReferenceKernel", "REFERENCE_KERNEL"]


class ReferenceKernel:
    """``log_softmax(h @ W.T)`` at the requested ids, with logits upcast to at least fp32."""

    name = "reference"

    def __call__(
        self, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, ids_N_K: torch.Tensor
    ) -> torch.Tensor:
        return full_logprobs(hidden_N_H, weight_V_H).gather(1, ids_N_K)

    def divergence(
        self,
        hidden_N_H: torch.Tensor,
        weight_V_H: torch.Tensor,
        teacher_hidden_N_G: torch.Tensor,
        teacher_weight_V_G: torch.Tensor,
        *,
        beta: float,
        temperature: float,
    ) -> torch.Tensor:
        """Per-row divergence of the student from the teacher, exactly TRL's ``generalized_jsd_loss``.

        ``beta = 0``: forward KL(p_t ‖ p_s); ``beta = 1``: reverse KL(p_s ‖ p_t); in between
        ``β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m)`` with the mixture ``m = (1 − β)·p_s + β·p_t``. Both
        models' logits are divided by ``temperature``. Builds the [N, V] logits in at least fp32; the
        teacher is a constant (no gradient reaches it).
        """
        dtype = torch.float32
        for tensor in (hidden_N_H, weight_V_H, teacher_hidden_N_G, teacher_weight_V_G):
            dtype = torch.promote_types(dtype, tensor.dtype)
        student_N_V = torch.log_softmax(hidden_N_H.to(dtype) @ weight_V_H.to(dtype).T / temperature, dim=-1)
        with torch.no_grad():
            teacher_logits_N_V = teacher_hidden_N_G.to(dtype) @ teacher_weight_V_G.to(dtype).T
            teacher_N_V = torch.log_softmax(teacher_logits_N_V / temperature, dim=-1)
        if beta == 0:
            return (teacher_N_V.exp() * (teacher_N_V - student_N_V)).sum(-1)
        if beta == 1:
            return (student_N_V.exp() * (student_N_V - teacher_N_V)).sum(-1)
        mixture_N_V = torch.logsumexp(
            torch.stack([student_N_V + math.log(1 - beta), teacher_N_V + math.log(beta)]), dim=0
        )
        teacher_kl_N = (teacher_N_V.exp() * (teacher_N_V - mixture_N_V)).sum(-1)
        student_kl_N = (student_N_V.exp() * (student_N_V - mixture_N_V)).sum(-1)
        return beta * teacher_kl_N + (1 - beta) * student_kl_N


REFERENCE_KERNEL = ReferenceKernel()
