"""FSDP2 for the ``torch`` trainer, when the run is launched by torchrun.

Each decoder layer is an FSDP unit of its own and the step's forward (:class:`StepForward`) is the
root: the parameters outside the layers (embeddings, final norm, head) are gathered around a whole
micro-batch, so the loss kernel reads the head weight inside the root's forward, whole, and its
gradient is reduce-scattered like every other. With one process the same module runs unsharded.

``bf16-mixed`` gathers the layers' weights in bf16 (FSDP2's ``MixedPrecisionPolicy``: half the
all-gather traffic and unsharded memory) and reduce-scatters their gradients in fp32; the shards,
the optimizer state and the root (embeddings, head, the loss kernel) stay fp32. The layers still run
under autocast and take the fp32 residual stream as it comes (inputs are not cast), and each
layer's norms are a group of their own gathered in fp32, so the step computes what the one-process
``bf16-mixed`` step computes (rounding Qwen3's q/k-norm weights to bf16 moves logprobs by about
0.1, twice what autocast itself does).
"""

from __future__ import annotations

from typing import Any

import torch

from distill import LossKernel, Objective, TokenBatch, completion_hidden_states, final_hidden_states, head_weight

__all__ = ["StepForward", "decoder_layers", "shard"]


class StepForward(torch.nn.Module):
    """One micro-batch's loss sum and metric sums, as a module's forward."""

    def __init__(self, model: Any, objective: Objective, kernel: LossKernel, *, mixed: bool) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.kernel = kernel
        self.mixed = mixed  # bf16-mixed: the body under bf16 autocast, the kernel in fp32

    def forward(self, micro: TokenBatch | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``micro`` None: a pass through every weight that adds nothing, for a process without
        rows (FSDP's collectives need every process in every pass)."""
        weight_V_H = head_weight(self.model)
        if micro is None:
            ids_1_1 = torch.zeros((1, 1), dtype=torch.long, device=weight_V_H.device)
            with torch.autocast(weight_V_H.device.type, dtype=torch.bfloat16, enabled=self.mixed):
                hidden = final_hidden_states(self.model, ids_1_1, torch.ones_like(ids_1_1))
            return 0.0 * (hidden.float().sum() + weight_V_H.sum()), {}
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
    """Shard every decoder layer (gathered in bf16 under bf16-mixed), then the rest under the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(step_forward.model)
    if not layers:
        raise ValueError(f"{type(step_forward.model).__name__} names no decoder layer class in "
                         f"_no_split_modules: there is nothing to shard it by")
    layer_policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
    ) if step_forward.mixed else MixedPrecisionPolicy()
    for layer in layers:
        if step_forward.mixed:
            fully_shard(_norms(layer))  # fp32, as autocast computes them
        fully_shard(layer, mp_policy=layer_policy)
    fully_shard(step_forward)


def _norms(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The layer's modules whose own weights are all vectors: its norms."""
    return [module for module in layer.modules()
            if (own := list(module.parameters(recurse=False))) and all(p.dim() == 1 for p in own)]
