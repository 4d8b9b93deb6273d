"""What the core needs from a transformers causal LM: final hidden states and the output head.

Losses and teachers work on hidden states [N, H] and the head weight [V, H] so a fused kernel can
compute logprobs without materialising [N, V] logits. Tied embeddings work as is (the head weight
*is* the embedding matrix).
"""

from __future__ import annotations

from typing import Any

import torch

from distill.errors import DistillError

__all__ = ["head_weight", "final_hidden_states", "completion_hidden_states", "full_logprobs"]

_UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def head_weight(model: Any) -> torch.Tensor:
    """The [V, H] output head, refusing heads whose logits are not plainly ``h @ W.T``."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise DistillError(f"{type(model).__name__} has no output embedding layer to score with.")
    if getattr(head, "bias", None) is not None:
        raise DistillError(f"{type(model).__name__}'s output head has a bias, which is not supported yet.")
    for attribute in _UNSUPPORTED_LOGIT_TRANSFORMS:
        if getattr(model.config, attribute, None) not in (None, 1, 1.0):
            raise DistillError(
                f"{type(model).__name__} transforms its logits ({attribute}), which the loss "
                f"kernels do not reproduce yet."
            )
    return head.weight


def final_hidden_states(
    model: Any, input_ids_B_L: torch.Tensor, attention_mask_B_L: torch.Tensor
) -> torch.Tensor:
    """Last-layer hidden states [B, L, H] (after the final norm) of a right-padded batch."""
    # a PEFT model's own base_model is its tuner, which returns logits: take the wrapped model's body
    unwrap = getattr(model, "get_base_model", None)
    body = (unwrap() if unwrap is not None else model).base_model
    return body(input_ids=input_ids_B_L, attention_mask=attention_mask_B_L).last_hidden_state


def completion_hidden_states(
    model: Any,
    input_ids_B_L: torch.Tensor,
    attention_mask_B_L: torch.Tensor,
    positions_B_C: torch.Tensor,
    mask_B_C: torch.Tensor,
) -> torch.Tensor:
    """Hidden states [N, H] at the masked completion positions, in row-major token order."""
    hidden_B_L_H = final_hidden_states(model, input_ids_B_L, attention_mask_B_L)
    rows_B_C = torch.arange(positions_B_C.shape[0], device=positions_B_C.device)[:, None].expand_as(positions_B_C)
    return hidden_B_L_H[rows_B_C[mask_B_C], positions_B_C[mask_B_C]]


def full_logprobs(hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor) -> torch.Tensor:
    """``log_softmax(h @ W.T)`` [N, V] in at least fp32: the plain way, for references, probes and
    teachers scoring a few rows (training goes through a loss kernel instead)."""
    dtype = torch.promote_types(hidden_N_H.dtype, torch.float32)
    return torch.log_softmax(hidden_N_H.to(dtype) @ weight_V_H.to(dtype).T, dim=-1)
