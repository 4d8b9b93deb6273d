"""distill: on-policy distillation of language models, as a plugin framework.

The public surface for plugin authors: ``hookimpl``, the spec types to return from hooks, the
protocols their objects keep (subclass them for the optional members' defaults), the option
validators, and the data types of a step. Plugins import from here and :mod:`distill.testing`.
"""

from distill.align import TokenBatch, completion_positions
from distill.config import display_config, finite, non_negative, positive, resolve_path, resumable, unit_interval
from distill.data import sample_seed
from distill.errors import CheckpointError, ConfigError, DataError, DistillError, PluginError
from distill.hookspecs import hookimpl
from distill.modeling import completion_hidden_states, final_hidden_states, full_logprobs, head_weight
from distill.preflight import device_problems, folder_problems
from distill.protocols import (
    SHARDED,
    Blender,
    Checkpoint,
    CheckpointBackend,
    Component,
    LossKernel,
    MetricSink,
    Objective,
    Router,
    Sampler,
    SkipRow,
    TeacherScorer,
    Trainer,
)
from distill.types import (
    BlenderSpec,
    ComponentSpec,
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
    TeacherRef,
    TeacherScores,
    TeacherSpec,
    TrainerSpec,
    WeightedScores,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "hookimpl",
    "completion_positions",
    "completion_hidden_states",
    "final_hidden_states",
    "full_logprobs",
    "head_weight",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistillError",
    "PluginError",
    "display_config",
    "device_problems",
    "folder_problems",
    "finite",
    "non_negative",
    "positive",
    "resolve_path",
    "resumable",
    "sample_seed",
    "unit_interval",
    "SHARDED",
    "Blender",
    "Checkpoint",
    "CheckpointBackend",
    "Component",
    "LossKernel",
    "MetricSink",
    "Objective",
    "Router",
    "Sampler",
    "SkipRow",
    "TeacherScorer",
    "Trainer",
    "TokenBatch",
    "BlenderSpec",
    "ComponentSpec",
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
    "TeacherRef",
    "TeacherScores",
    "TeacherSpec",
    "TrainerSpec",
    "WeightedScores",
]
