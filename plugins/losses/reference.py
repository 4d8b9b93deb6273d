"""The reference logprob kernel: full logits, then a gather. Simple, exact, memory-hungry."""

from __future__ import annotations

import torch

__all__ = ["ReferenceKernel", "REFERENCE_KERNEL"]


class ReferenceKernel:
    """``log_softmax(h @ W.T)`` at the requested ids, with logits upcast to at least fp32."""

    name = "reference"

    def __call__(
        self, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, ids_N_K: torch.Tensor
    ) -> torch.Tensor:
        dtype = torch.promote_types(hidden_N_H.dtype, torch.float32)
        logits_N_V = hidden_N_H.to(dtype) @ weight_V_H.to(dtype).T
        return torch.log_softmax(logits_N_V, dim=-1).gather(1, ids_N_K)


REFERENCE_KERNEL = ReferenceKernel()
