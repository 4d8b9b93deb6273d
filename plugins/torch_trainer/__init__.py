"""Built-in plugin ``torch_trainer``: the ``torch`` trainer, one optimizer step per batch on one device.

The student's logprobs at the ids the objective needs come from a loss kernel fed with final
hidden states [N, H] and the head weight [V, H]. The loss is normalised over the whole step (by its
tokens, its sequences, or not at all: ``loss.normalize``), never per micro-batch, so micro-batching
never changes the gradient. ``precision = "bf16-mixed"`` runs the model body under bf16 autocast and
hands the kernel fp32 hidden states, so master weights, optimizer state and the loss stay fp32.

``[trainer.lora]`` wraps the student in a ``peft`` LoRA model (the ``distill[lora]`` extra): only
the adapter gets gradients and optimizer state, checkpoints hold the adapter alone (resume loads
``student.model`` and the checkpoint's adapter on top), and the final export is the merged model
with the adapter beside it. The frozen head still reaches the loss kernel unchanged.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import random
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

from distill import (
    BuildContext,
    ConfigError,
    LossKernel,
    Objective,
    TokenBatch,
    Trainer,
    TrainerSpec,
    completion_hidden_states,
    head_weight,
    hookimpl,
    positive,
    resolve_path,
)

__all__ = ["TorchTrainer", "TorchTrainerOptions", "LoraOptions", "resolve_device", "checkpoint_activations"]

Precision = Literal["fp32", "bf16-mixed", "bf16"]
_ADAPTER_CONFIG = "adapter_config.json"  # what marks a folder as a PEFT adapter


def _probability_below_one(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"must be in [0, 1), got {value!r}")


@attrs.frozen(kw_only=True)
class LoraOptions:
    rank: int = attrs.field(default=16, validator=positive)
    alpha: float = attrs.field(default=32.0, validator=positive)
    dropout: float = attrs.field(default=0.0, validator=_probability_below_one)
    target_modules: tuple[str, ...] = ()  # empty: every linear layer of the decoder
    warm_start_adapter: str | None = None


@attrs.frozen(kw_only=True)
class TorchTrainerOptions:
    device: str = "auto"
    precision: Precision = "fp32"
    gradient_checkpointing: bool = False
    lora: LoraOptions | None = None


def resolve_device(device: str, student_device: str) -> str:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else ``student.device`` (``cpu`` by default)."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return student_device


def checkpoint_activations(model: Any) -> None:
    """The model's own activation checkpointing, non-reentrant: the reentrant kind loses the
    gradient when a layer's inputs do not require grad (frozen embeddings, LoRA). transformers 5
    renamed the method; 4.x has only the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class TorchTrainer(Trainer):
    def __init__(
        self, model: Any, config: Any, options: TorchTrainerOptions, objective: Objective, kernel: LossKernel
    ) -> None:
        self.model = model
        self.config = config
        self.options = options
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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, train.lr_factor)

    @classmethod
    def build(cls, options: TorchTrainerOptions, context: BuildContext) -> TorchTrainer:
        from transformers import AutoModelForCausalLM

        config = context.run_config
        dtype = torch.bfloat16 if options.precision == "bf16" else getattr(torch, config.student.dtype)
        # a LoRA checkpoint holds the adapter alone: the base is the student's own folder
        resumed_adapter = Path(context.student_path, _ADAPTER_CONFIG).is_file()
        if resumed_adapter and options.lora is None:
            raise ConfigError([f"checkpoint {context.student_path} holds a LoRA adapter, which training "
                               f"without [trainer.lora] would drop: keep it to resume @ {context.path}.lora"])
        base_path = resolve_path(config.student.model, config) if resumed_adapter else context.student_path
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        if options.gradient_checkpointing:
            checkpoint_activations(model)
        if options.lora is not None:
            warm = options.lora.warm_start_adapter
            adapter = context.student_path if resumed_adapter else warm and resolve_path(warm, config)
            model = _with_lora(model, options.lora, adapter)
        model.to(resolve_device(options.device, config.student.device))
        kernel = context.kernel_for(model.device.type, str(dtype).removeprefix("torch."))
        return cls(model, config, options, context.objective, kernel)

    def train_step(self, batch: TokenBatch) -> dict[str, float]:
        """Forward/backward over micro-batches, clip, step. Returns token-averaged metrics."""
        model, train = self.model, self.config.train
        device = next(model.parameters()).device
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_tokens = batch.num_tokens
        divisor = {"token": total_tokens, "sequence": batch.num_sequences, "sum": 1}[self.config.loss.normalize]
        sums: dict[str, float] = {"loss": 0.0}
        weight_V_H = head_weight(model)
        mixed = self.options.precision == "bf16-mixed"
        for start in range(0, batch.num_sequences, train.micro_batch_size):
            micro = batch.select(start, start + train.micro_batch_size)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
                hidden_N_H = completion_hidden_states(
                    model,
                    micro.input_ids_B_L.to(device),
                    micro.attention_mask_B_L.to(device),
                    micro.positions_B_C.to(device),
                    micro.mask_B_C.to(device),
                )
            hidden_N_H = hidden_N_H.to(weight_V_H.dtype)  # bf16-mixed: the kernel sees fp32, as it expects
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

    def final_model(self) -> Any:
        """With LoRA, the adapter merged into a copy, so ``model`` keeps the adapter to save beside it."""
        if self.options.lora is None:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()

    def final_adapter(self) -> Any | None:
        return self.model if self.options.lora is not None else None

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


def _with_lora(model: Any, lora: LoraOptions, adapter: str | None) -> Any:
    """``model`` wrapped in a trainable LoRA adapter: ``adapter``'s (its own rank and targets) or a
    fresh one. peft's ``all-linear`` leaves out the head; embeddings are not linear layers."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    return get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules) or "all-linear"))


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


def _unmatched_targets(lora: LoraOptions, context: BuildContext) -> list[str]:
    """Each ``target_modules`` entry that no module name equals or ends with (peft's rule), read
    from the student built on the meta device: no weights load. A student config that cannot load
    is preflight's to report."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        student = AutoConfig.from_pretrained(resolve_path(context.run_config.student.model, context.run_config))
    except (OSError, ValueError):
        return []
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(student)
    names = [name for name, _ in model.named_modules()]
    return [f"{target!r} matches no module of {type(model).__name__} (names end like 'q_proj' or "
            f"'mlp.down_proj') @ {context.path}.lora.target_modules[{i}]"
            for i, target in enumerate(lora.target_modules)
            if not any(name == target or name.endswith(f".{target}") for name in names)]


def _check(options: TorchTrainerOptions, context: BuildContext) -> list[str]:
    """Precision sets the weights' dtype itself: a non-fp32 ``student.dtype`` beside it is ambiguous.
    LoRA needs peft, a warm start a PEFT adapter folder, and each target module a match; each
    would fail only once models load."""
    problems = []
    dtype = context.run_config.student.dtype
    if options.precision != "fp32" and dtype != "float32":
        problems.append(f"precision '{options.precision}' chooses the weights' dtype itself, but student.dtype is "
                        f"'{dtype}': leave student.dtype at 'float32' or set precision = 'fp32' @ {context.path}.precision")
    if options.lora is not None:
        if importlib.util.find_spec("peft") is None:
            problems.append(f"LoRA trains through peft, which is not installed: pip install 'distill[lora]' "
                            f"@ {context.path}.lora")
        warm = options.lora.warm_start_adapter
        if warm and not Path(resolve_path(warm, context.run_config), _ADAPTER_CONFIG).is_file():
            problems.append(f"{warm!r} is not a PEFT adapter folder (it has no {_ADAPTER_CONFIG}) "
                            f"@ {context.path}.lora.warm_start_adapter")
        if options.lora.target_modules:
            problems += _unmatched_targets(options.lora, context)
    return problems


@hookimpl
def distill_trainers() -> list[TrainerSpec]:
    return [TrainerSpec(
        name="torch",
        summary="Trains the student in this process with AdamW: fp32, bf16-mixed or bf16, optional "
                "gradient checkpointing and LoRA.",
        config_cls=TorchTrainerOptions,
        factory=TorchTrainer.build,
        check=_check,
    )]
