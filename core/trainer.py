"""The local torch trainer: one optimizer step from a step's :class:`TokenBatch`.

The student's logprobs at the ids the objective needs come from a loss kernel fed with final
hidden states [N, H] and the head weight [V, H]. The loss is normalised by the active tokens of the
whole step, not per micro-batch, so micro-batching never changes the gradient.
"""

from __future__ import annotations

import math
import random
from typing import Any

import attrs
import torch

from distill.align import TokenBatch
from distill.config import RunConfig, TrainConfig
from distill.modeling import completion_hidden_states, head_weight
from distill.protocols import LossKernel, Objective

__all__ = ["Trainer", "lr_factor"]


def lr_factor(step: int, train: TrainConfig) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based)."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    if train.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(
        self, model: Any, config: RunConfig, objective: Objective, kernel: LossKernel
    ) -> None:
        self.model = model
        self.config = config
        self.objective = objective
        self.kernel = kernel
        train = config.train
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters,
            lr=train.learning_rate,
            betas=train.adam_betas,
            eps=train.adam_eps,
            weight_decay=train.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, train)
        )

    def train_step(self, batch: TokenBatch) -> dict[str, float]:
        """Forward/backward over micro-batches, clip, step. Returns token-averaged metrics."""
        model, train = self.model, self.config.train
        device = next(model.parameters()).device
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_tokens = batch.num_tokens
        divisor = total_tokens if self.config.loss.normalize == "token" else 1
        sums: dict[str, float] = {"loss": 0.0}
        weight_V_H = head_weight(model)
        for start in range(0, batch.num_sequences, train.micro_batch_size):
            micro = batch.select(start, start + train.micro_batch_size)
            hidden_N_H = completion_hidden_states(
                model,
                micro.input_ids_B_L.to(device),
                micro.attention_mask_B_L.to(device),
                micro.positions_B_C.to(device),
                micro.mask_B_C.to(device),
            )
            loss_sum, metric_sums = self.objective.loss(hidden_N_H, weight_V_H, self.kernel, _on(micro, device))
            (loss_sum / divisor).backward()
            sums["loss"] += float(loss_sum.detach())
            for name, value in metric_sums.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        # max_norm=inf measures the norm without clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, train.max_grad_norm or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        metrics = {name: value / max(1, total_tokens) for name, value in sums.items()}
        metrics.update(grad_norm=float(grad_norm), learning_rate=lr)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": list(random.getstate()[1]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate((3, tuple(state["python_rng"]), None))


def _on(batch: TokenBatch, device: torch.device) -> TokenBatch:
    if device.type == "cpu":
        return batch
    return attrs.evolve(
        batch,
        **{
            f.name: getattr(batch, f.name).to(device)
            for f in attrs.fields(TokenBatch)
            if isinstance(getattr(batch, f.name), torch.Tensor)
        },
    )
