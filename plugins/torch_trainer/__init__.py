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
import functools
import importlib.util
import math
import os
import random
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from distill import (
    SHARDED,
    BuildContext,
    ConfigError,
    LossKernel,
    Objective,
    TokenBatch,
    Trainer,
    TrainerSpec,
    device_problems,
    distributed,
    hookimpl,
    positive,
    resolve_path,
    resumable,
)
from distill.plugins.torch_trainer.sharding import StepForward, shard

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
    device: str = resumable(default="auto")
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
        self.step_forward = StepForward(model, objective, kernel, mixed=options.precision == "bf16-mixed")
        if distributed.sharded():
            shard(self.step_forward)  # before the optimizer: it holds the shards
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

    def train_step(self, batch: TokenBatch | None) -> dict[str, float]:
        """Forward/backward over micro-batches, clip, step. Returns token-averaged metrics.

        Sharded, each process holds its share of the step's rows: the loss is normalised by the
        whole step's count, and gradients are summed over processes (FSDP averages, so each loss is
        scaled by the world size), giving one process's gradient. Every process runs as many
        micro-batches as the busiest one (extra ones weigh zero, and a process without rows passes
        through the weights alone), as FSDP's collectives require."""
        train = self.config.train
        device = next(self.model.parameters()).device
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        rows = batch.num_sequences if batch is not None else 0
        counts = distributed.sum_values({"token": batch.num_tokens if batch is not None else 0, "sequence": rows})
        divisor = {**counts, "sum": 1}[self.config.loss.normalize] / distributed.world_size()
        starts = list(range(0, rows, train.micro_batch_size))
        extra = distributed.max_value(len(starts)) - len(starts)
        sums: dict[str, float] = {"loss": 0.0}
        for start, weight in [*((start, 1.0) for start in starts), *[(0, 0.0)] * extra]:
            micro = None if batch is None else _on(batch.select(start, start + train.micro_batch_size), device)
            loss_sum, metric_sums = self.step_forward(micro)
            (loss_sum * weight / divisor).backward()
            sums["loss"] += weight * float(loss_sum.detach())
            for name, value in metric_sums.items():
                sums[name] = sums.get(name, 0.0) + weight * float(value)
        # max_norm=inf measures the norm without clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, train.max_grad_norm or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        sums = distributed.summed(sums)  # a process without rows has no objective metrics
        metrics = {name: value / max(1, counts["token"]) for name, value in sums.items()}
        metrics.update(grad_norm=float(distributed.full_tensor(grad_norm)), learning_rate=lr)
        return metrics

    def checkpoint_model(self) -> Any | None:
        return None if distributed.sharded() else self.model  # sharded: in the state's SHARDED part

    def final_model(self) -> Any:
        """With LoRA, the adapter merged into a copy, so the model keeps the adapter to save beside it.
        Sharded, gathered whole (every process calls this; the others get None)."""
        whole = self._whole
        if whole is None or self.options.lora is None:
            return whole
        return copy.deepcopy(whole).merge_and_unload()

    def final_adapter(self) -> Any | None:
        return self._whole if self.options.lora is not None else None

    @functools.cached_property
    def _whole(self) -> Any:
        """The model unsharded: itself, or gathered to the main process once (a collective)."""
        return distributed.whole_copy(self.model) if distributed.sharded() else self.model

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state keyed by parameter name, so a checkpoint resumes under any number of
        processes. Sharded, the weights and the optimizer state stay in shards (``SHARDED``)."""
        state = {"scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "python_rng": list(random.getstate()[1])}
        if distributed.sharded():
            state[SHARDED] = self._sharded_state()
        else:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        return state

    def _sharded_state(self) -> dict[str, Any]:
        """The weights that train (frozen ones, LoRA's base, load from ``student.model``) and the
        optimizer. By name: DCP's ``ignore_frozen_params`` keeps a tied head whose embedding is frozen."""
        trained = {name for name, p in self.model.named_parameters(remove_duplicate=False) if p.requires_grad}
        return {"model": {name: t for name, t in get_model_state_dict(self.model).items() if name in trained},
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if SHARDED in state:  # a sharded checkpoint, loaded into our shards (or whole tensors), resharded
            sharded = self._sharded_state()
            state[SHARDED](sharded)
            # the loader filled every trained weight or refused; the frozen ones came with student.model
            set_model_state_dict(self.model, sharded["model"], options=StateDictOptions(strict=False))
            set_optimizer_state_dict(self.model, self.optimizer, sharded["optimizer"])
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
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


def _without_bf16(device: str) -> str | None:
    """Why ``device`` cannot compute in bfloat16 on this machine, or None when it can. A CPU always
    can; CUDA (and XPU) answer through their torch module's ``is_bf16_supported`` for that device,
    which starts the runtime; a type whose module cannot answer is refused, not guessed."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return f"torch knows no device {device!r}"
    if parsed.type == "cpu":
        return None
    backend = getattr(torch, parsed.type, None)
    if getattr(backend, "is_bf16_supported", None) is None:
        return f"distill cannot tell whether {device!r} has it (torch.{parsed.type} has no is_bf16_supported)"
    count = backend.device_count()
    index = parsed.index or 0
    if count == 0:
        return f"this machine has no {parsed.type} device (torch finds none) for {device!r}"
    if index >= count:
        return (f"this machine has {count} {parsed.type} device(s), {parsed.type}:0 to {parsed.type}:{count - 1}, "
                f"not {device!r}")
    with backend.device(index):
        if backend.is_bf16_supported():
            return None
    return f"{device!r} has none (torch.{parsed.type}.is_bf16_supported() is false there)"


def _check(options: TorchTrainerOptions, context: BuildContext) -> list[str]:
    """Precision sets the weights' dtype itself: a non-fp32 ``student.dtype`` beside it is ambiguous;
    the device must exist, and bf16 needs a device that has it. LoRA needs peft, a warm start a PEFT adapter folder, and
    each target module a match; each would fail only once models load."""
    problems = []
    dtype = context.run_config.student.dtype
    if options.precision != "fp32" and dtype != "float32":
        problems.append(f"precision '{options.precision}' chooses the weights' dtype itself, but student.dtype is "
                        f"'{dtype}': leave student.dtype at 'float32' or set precision = 'fp32' @ {context.path}.precision")
    device = resolve_device(options.device, context.run_config.student.device)
    absent = device_problems(device, f"{context.path}.device") if options.device != "auto" else []
    problems += absent
    if options.precision != "fp32" and not absent and (why := _without_bf16(device)):
        problems.append(f"precision '{options.precision}' computes in bfloat16, but {why}: set precision = 'fp32' "
                        f"or choose another trainer.device @ {context.path}.precision")
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
