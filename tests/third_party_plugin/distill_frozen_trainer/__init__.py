"""A third-party trainer backend: it measures the loss and never changes the weights.

A baseline (what a run reports with no training at all), and the smallest honest
:class:`distill.Trainer`: the tests register it and select it with ``[trainer] backend = "frozen"``.
"""

from __future__ import annotations

from typing import Any

import torch

from distill import BuildContext, TokenBatch, Trainer, TrainerSpec, completion_hidden_states, head_weight, hookimpl


class FrozenTrainer(Trainer):
    def __init__(self, model: Any, context: BuildContext) -> None:
        self.model = model
        self.objective = context.objective
        self.kernel = context.kernel_for(model.device.type, str(model.dtype).removeprefix("torch."))
        self.steps = 0

    @classmethod
    def build(cls, options: Any, context: BuildContext) -> FrozenTrainer:
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(context.student_path), context)

    @torch.no_grad()
    def train_step(self, batch: TokenBatch) -> dict[str, float]:
        hidden_N_H = completion_hidden_states(self.model, batch.input_ids_B_L, batch.attention_mask_B_L,
                                              batch.positions_B_C, batch.mask_B_C)
        loss_sum, _ = self.objective.loss(hidden_N_H, head_weight(self.model), self.kernel, batch)
        self.steps += 1
        return {"loss": float(loss_sum) / max(1, batch.num_tokens), "grad_norm": 0.0, "learning_rate": 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]


@hookimpl
def distill_trainers():
    return [TrainerSpec(name="frozen", summary="Measures the loss, never changes the weights.",
                        factory=FrozenTrainer.build)]
