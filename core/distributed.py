"""One process or many under ``torchrun``: the rank, the world, and the few collectives the loop uses.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`start` joins the process group
(NCCL when CUDA is available, else gloo), and the run is then :func:`sharded` (even with one process:
``torchrun --nproc_per_node 1`` runs the sharded code path, which is how it is checked on one GPU).
Started without torchrun nothing joins and every function here is the identity, so the plain run
takes exactly the path it always took.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["start", "stop", "sharded", "world_size", "rank", "is_main", "my_share", "sum_values", "summed",
           "max_value", "gather", "from_main", "barrier", "full_tensor", "unsharded_like", "whole_copy"]

T = TypeVar("T")


def start() -> None:
    """Join the process group when launched by torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sharded() -> bool:
    """Whether this run is one of torchrun's processes, its student sharded over them."""
    return dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """The process that writes metrics, status, summaries and the final model."""
    return rank() == 0


def my_share(items: Sequence[T]) -> list[tuple[int, T]]:
    """This process's items with their positions: every ``world_size``-th, from ``rank``. Shares
    differ in size by at most one."""
    return [(position, item) for position, item in enumerate(items) if position % world_size() == rank()]


def sum_values(values: Mapping[str, float]) -> dict[str, float]:
    """Each key's sum over processes (every process passes the same keys)."""
    if not dist.is_initialized():
        return dict(values)
    keys = sorted(values)
    total = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(total)
    return dict(zip(keys, total.tolist(), strict=True))


def max_value(value: int) -> int:
    if not dist.is_initialized():
        return value
    top = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return int(top)


def gather(value: T) -> list[T]:
    """Every process's ``value`` (picklable), in rank order, on every process."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def summed(counters: Mapping[str, Any]) -> dict[str, Any]:
    """Counters (JSON-like) summed over processes: numbers add, mappings merge key by key, anything
    else is the first process's. A collective: every process calls it."""
    return _total(gather(dict(counters)))


def _total(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    if all(isinstance(v, Mapping) for v in present):
        keys = dict.fromkeys(key for v in present for key in v)
        return {key: _total([v.get(key) for v in present]) for key in keys}
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return sum(present)
    return present[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded parameter gathered whole (a collective: every process calls it), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def from_main(value: T) -> T:
    """The main process's ``value`` (picklable), on every process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def unsharded_like(model: Any) -> Any:
    """A plain, unsharded model built as ``model`` is (its config and dtype, and a PEFT model's
    adapter), with fresh weights, on the CPU: a copy to gather the shards into."""
    from transformers import AutoModelForCausalLM

    peft = sys.modules.get("peft")  # a PEFT model exists only once peft is imported
    if peft is not None and isinstance(model, peft.PeftModel):
        base = AutoModelForCausalLM.from_config(model.get_base_model().config, dtype=model.dtype)
        return peft.get_peft_model(base, copy.deepcopy(model.peft_config[model.active_adapter]))
    return AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)


def whole_copy(model: Any, into: Any = None) -> Any:
    """The sharded ``model`` gathered into a plain, unsharded copy on the main process: ``into``
    when given (reused across calls), else a new one; None on the other processes. A collective:
    every process calls it. The gathered tensors go to CPU one by one, so a device holds one whole
    tensor at a time."""
    state = {name: full_tensor(tensor).detach().cpu() for name, tensor in model.state_dict().items()}
    if not is_main():
        return None
    if into is None:
        into = unsharded_like(model)
    into.load_state_dict(state)
    return into
