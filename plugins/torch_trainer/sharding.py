"""FSDP2 for the ``torch`` trainer, when the run is launched by torchrun.

Each decoder layer is an FSDP unit of its own and the step's forward (:class:`StepForward`) is the
root: the parameters outside the layers (embeddings, final norm, head) are gathered around a whole
micro-batch, so the loss kernel reads the head weight inside the root's forward, whole, and its
gradient is reduce-scattered like every other. With one process the same module runs unsharded.
"""

from __future__ import annotations

from typing import Any

import torch

from distill import LossKernel, Objective, TokenBatch, completion_hidden_states, head_weight

__all__ = ["StepForward", "decoder_layers", "shard"]


class StepForward(torch.nn.Module):
    """One micro-batch's loss sum and metric sums, as a module's forward."""

    def __init__(self, model: Any, objective: Objective, kernel: LossKernel, *, mixed: bool) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.kernel = kernel
        self.mixed = mixed  # bf16-mixed: the body under bf16 autocast, the kernel in fp32

    def forward(self, micro: TokenBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weight_V_H = head_weight(self.model)
        with torch.autocast(weight_V_H.device.type, dtype=torch.bfloat16, enabled=self.mixed):
            hidden_N_H = completion_hidden_states(
                self.model, micro.input_ids_B_L, micro.attention_mask_B_L, micro.positions_B_C, micro.mask_B_C
            )
        return self.objective.loss(hidden_N_H.to(weight_V_H.dtype), weight_V_H, self.kernel, micro)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks transformers itself never splits (``_no_split_modules``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard(step_forward: StepForward) -> None:
    """Shard every decoder layer, then the rest under the root. Weights stay in their dtype:
    bf16-mixed keeps autocast (as with one process), so the all-gathers move fp32 weights."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(step_forward.model)
    if not layers:
        raise ValueError(f"{type(step_forward.model).__name__} names no decoder layer class in "
                         f"_no_split_modules: there is nothing to shard it by")
    for layer in layers:
        fully_shard(layer)
    fully_shard(step_forward)
