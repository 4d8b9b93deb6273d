"""The hooks of distill: the whole contract between the core and its plugins.

Three families:

* **Registration hooks** (``distill_samplers`` … ``distill_metric_sinks``) return lists of frozen
  spec objects from :mod:`distill.types`. They must be cheap: import heavy libraries inside the
  spec's ``factory``, not in the hook. Run configs name components by ``spec.name``.
* **Dispatch** (``distill_select_loss_kernel``) is ``firstresult``: the first plugin that returns
  something handles the call. Defaults are ``trylast`` so any plugin can claim the call first.
* **Observers** (``distill_on_step_end``, ``distill_on_checkpoint_saved``) are called on every
  plugin; their return values are ignored.

Hooks are always called with keyword arguments; new arguments are only ever added, and pluggy
passes a hook implementation just the arguments it names, so old plugins keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from distill.protocols import LossKernel
    from distill.types import (
        BlenderSpec,
        CheckpointBackendSpec,
        LossSpec,
        MetricSinkSpec,
        RouterSpec,
        RunInfo,
        SamplerSpec,
        TeacherSpec,
        TrainerSpec,
    )

PROJECT_NAME = "distill"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "hookspec", "hookimpl"]


@hookspec
def distill_samplers() -> list[SamplerSpec]:
    """Register student samplers, selected by ``[sampler] backend = NAME``.

    A sampler's factory returns a :class:`distill.protocols.Sampler`.

    Example::

        @hookimpl
        def distill_samplers():
            return [SamplerSpec(name="my_sampler", summary="...", factory=MySampler.build)]
    """


@hookspec
def distill_teachers() -> list[TeacherSpec]:
    """Register teacher scorers, selected per ``[[teachers]]`` entry by ``backend = NAME``.

    A teacher's factory returns a :class:`distill.protocols.TeacherScorer`. A backend that caps
    top-K gives its spec a ``check`` reading ``context.top_k``, so a larger ``loss.top_k`` fails at
    config time; ``model_of`` and ``tokenizer_of`` name its model and where its tokenizer lives.

    Example::

        @hookimpl
        def distill_teachers():
            return [TeacherSpec(name="my_teacher", summary="...", config_cls=MyOptions,
                                factory=MyTeacher.build, model_of=lambda options: options.model)]
    """


@hookspec
def distill_routers() -> list[RouterSpec]:
    """Register routers, selected by ``[router] name = NAME``.

    A router's factory receives ``(options, context)`` and returns a
    :class:`distill.protocols.Router` that names the teacher(s) scoring each row.

    Example::

        @hookimpl
        def distill_routers():
            return [RouterSpec(name="by_length", summary="...", factory=ByLength.build)]
    """


@hookspec
def distill_losses() -> list[LossSpec]:
    """Register training objectives, selected by ``[loss] name = NAME``.

    A loss's factory returns a :class:`distill.protocols.Objective`. ``LossSpec.teacher_signal``
    says whether it needs per-token teacher logprobs (``"logprobs"``), top-K (``"topk"``, with
    ``LossSpec.top_k`` saying how many) or the teacher's hidden states and head (``"hidden"``, local
    teachers only).

    Example::

        @hookimpl
        def distill_losses():
            return [LossSpec(name="my_loss", summary="...", teacher_signal="logprobs",
                             factory=MyObjective)]
    """


@hookspec
def distill_blenders() -> list[BlenderSpec]:
    """Register blenders that merge several teachers' top-K targets into one.

    Example::

        @hookimpl
        def distill_blenders():
            return [BlenderSpec(name="max_prob", summary="...", factory=MaxProb)]
    """


@hookspec
def distill_trainers() -> list[TrainerSpec]:
    """Register trainer backends, selected by ``[trainer] backend = NAME``.

    A trainer's factory returns a :class:`distill.protocols.Trainer`: it loads the student from
    ``context.student_path``, trains it with ``context.objective`` and the kernel
    ``context.kernel_for(device_type, dtype)`` returns, and normalises the loss as
    ``run_config.loss.normalize`` says. A remote trainer implements ``train_step`` as the service's
    ``forward_backward`` and ``optim_step`` calls.

    Example::

        @hookimpl
        def distill_trainers():
            return [TrainerSpec(name="my_trainer", summary="...", config_cls=MyOptions,
                                factory=MyTrainer.build)]
    """


@hookspec
def distill_checkpoint_backends() -> list[CheckpointBackendSpec]:
    """Register checkpoint backends, selected by ``[checkpoint] backend = NAME``.

    A backend's factory returns a :class:`distill.protocols.CheckpointBackend`.

    Example::

        @hookimpl
        def distill_checkpoint_backends():
            return [CheckpointBackendSpec(name="s3", summary="...", factory=S3Store)]
    """


@hookspec
def distill_metric_sinks() -> list[MetricSinkSpec]:
    """Register metric sinks, enabled by ``[metrics] sinks = [NAME, …]``.

    A sink's factory returns a :class:`distill.protocols.MetricSink`.

    Example::

        @hookimpl
        def distill_metric_sinks():
            return [MetricSinkSpec(name="stdout", summary="...", factory=StdoutSink)]
    """


@hookspec(firstresult=True)
def distill_select_loss_kernel(loss: str, kernel: str, device: str, dtype: str) -> LossKernel | None:
    """Choose the kernel that computes the student's logprobs at the ids ``loss`` needs.

    Called once per run. ``loss`` is the loss name, ``kernel`` the requested kernel name from
    ``loss.kernel`` (``"auto"`` lets plugins decide), ``device`` the device type (``"cpu"``,
    ``"cuda"``…) and ``dtype`` the student's dtype name (``"float32"``…). Return a
    :class:`distill.protocols.LossKernel` (it has a ``name``) to claim the call, or None to pass.
    Return a kernel only when ``kernel`` is ``"auto"`` or your kernel's name. The reference kernel
    is ``trylast``, so any plugin can claim "auto" before it.

    Example::

        @hookimpl
        def distill_select_loss_kernel(loss, kernel, device, dtype):
            if kernel == "fused" or (kernel == "auto" and device == "cuda"):
                return fused_kernel
            return None
    """


@hookspec
def distill_on_step_end(run: RunInfo, step: int, metrics: Mapping[str, Any]) -> None:
    """Called after every optimizer step with that step's metrics (read-only).

    Example::

        @hookimpl
        def distill_on_step_end(run, step, metrics):
            print(step, metrics["loss"])
    """


@hookspec
def distill_on_checkpoint_saved(run: RunInfo, step: int, uri: str) -> None:
    """Called after a checkpoint is completely written, with where it lives.

    Example::

        @hookimpl
        def distill_on_checkpoint_saved(run, step, uri):
            upload(uri)
    """
