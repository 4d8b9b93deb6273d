"""distill: on-policy distillation of language models, as a plugin framework.

The public surface for plugin authors: ``hookimpl`` and the spec types to return from hooks.
"""

from distill.hookspecs import hookimpl
from distill.types import (
    BlenderSpec,
    BuildContext,
    CheckpointBackendSpec,
    LossSpec,
    MetricSinkSpec,
    NoOptions,
    PromptRow,
    Rollout,
    RouterSpec,
    RunInfo,
    SamplerSpec,
    SamplingParams,
    ScoreFailure,
    ScoreRequest,
    TeacherScores,
    TeacherSpec,
    WeightedScores,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "hookimpl",
    "BlenderSpec",
    "BuildContext",
    "CheckpointBackendSpec",
    "LossSpec",
    "MetricSinkSpec",
    "NoOptions",
    "PromptRow",
    "Rollout",
    "RouterSpec",
    "RunInfo",
    "SamplerSpec",
    "SamplingParams",
    "ScoreFailure",
    "ScoreRequest",
    "TeacherScores",
    "TeacherSpec",
    "WeightedScores",
]
