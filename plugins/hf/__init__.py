"""Built-in plugin ``hf``: a local transformers student sampler and teacher scorer.

The sampler shares the trainer's model (no weight sync needed); the teacher loads a frozen model
from a folder or hub id and returns per-token logprobs and any top-K up to the vocabulary.
transformers is imported only when a component is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import attrs

from distill import (
    BuildContext,
    SamplerSpec,
    TeacherSpec,
    device_problems,
    hookimpl,
    positive,
    resolve_path,
    resumable,
)

__all__ = ["HFSamplerOptions", "HFTeacherOptions"]


@attrs.frozen(kw_only=True)
class HFSamplerOptions:
    batch_size: int = resumable(default=64, validator=positive)


@attrs.frozen(kw_only=True)
class HFTeacherOptions:
    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = resumable(default=None)
    batch_size: int = resumable(default=64, validator=positive)


def _build_sampler(options: HFSamplerOptions, context: BuildContext) -> Any:
    from distill.plugins.hf.sampler import HFSampler

    return HFSampler.build(options, context)


def _build_teacher(options: HFTeacherOptions, context: BuildContext) -> Any:
    from distill.plugins.hf.teacher import HFTeacher

    return HFTeacher.build(options, context)


def _tokenizer_of(options: HFTeacherOptions, context: BuildContext) -> str | None:
    """The model's folder when it holds a tokenizer, or a hub id; None for a bare weights folder."""
    path = resolve_path(options.model, context.run_config)
    return path if Path(path, "tokenizer_config.json").exists() or not Path(path).exists() else None


@hookimpl
def distill_samplers() -> list[SamplerSpec]:
    return [
        SamplerSpec(
            name="hf",
            summary="Local KV-cached sampling with the trainer's student model.",
            config_cls=HFSamplerOptions,
            factory=_build_sampler,
        )
    ]


@hookimpl
def distill_teachers() -> list[TeacherSpec]:
    return [
        TeacherSpec(
            name="hf",
            summary="A local transformers model: logprobs, top-K up to the vocabulary, or its hidden states.",
            config_cls=HFTeacherOptions,
            factory=_build_teacher,
            model_of=lambda options: options.model,
            tokenizer_of=_tokenizer_of,
            signals=frozenset({"logprobs", "topk", "hidden"}),
            check=lambda options, context: device_problems(options.device, f"{context.path}.device")
            if options.device is not None else [],
        )
    ]
