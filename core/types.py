"""Typed, frozen objects that cross the plugin boundary: component specs and the data of a step."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

if TYPE_CHECKING:
    import torch

__all__ = [
    "NoOptions",
    "ComponentSpec",
    "SamplerSpec",
    "TeacherSpec",
    "RouterSpec",
    "LossSpec",
    "BlenderSpec",
    "CheckpointBackendSpec",
    "MetricSinkSpec",
    "TrainerSpec",
    "BuildContext",
    "TeacherRef",
    "PromptRow",
    "SamplingParams",
    "Rollout",
    "ScoreRequest",
    "TeacherScores",
    "TeacherSignal",
    "RunInfo",
    "WeightedScores",
    "ScoreFailure",
]

TeacherSignal = Literal["logprobs", "topk", "hidden"]


def _normalise_name(name: str) -> str:
    """Names compare case-insensitively with '-' and '_' equivalent ("Top-K" == "top_k")."""
    normalised = name.strip().lower().replace("-", "_")
    if not re.fullmatch(r"[a-z][a-z0-9_.]*", normalised):
        raise ValueError(f"invalid component name {name!r}: use letters, digits, '_', '-' or '.'")
    return normalised


@attrs.frozen
class NoOptions:
    """config_cls of a component that takes no options."""


@attrs.frozen(kw_only=True)
class ComponentSpec:
    """What a registration hook returns: a named, documented recipe for building one component.

    ``factory(options, context)`` builds the working object; ``options`` is an instance of
    ``config_cls`` structured from the run config, ``context`` a :class:`BuildContext`.
    Factories do the heavy imports and I/O, hooks stay cheap. ``check(options, context)``, if
    given, returns problems (``"message @ path"``) with the rest of the config, found at config
    time (``distill-run validate``) rather than mid-run; its context has no tokenizer or student.
    ``delegate(context)``, if given, makes the spec an alias: it returns the name of the component
    of the same kind to use instead, chosen at config time (the built-in router ``auto`` picks
    ``single``, ``routed`` or ``all``).
    """

    name: str = attrs.field(converter=_normalise_name)
    summary: str
    factory: Callable[[Any, BuildContext], Any]
    config_cls: type = NoOptions
    check: Callable[[Any, BuildContext], list[str]] | None = None
    delegate: Callable[[BuildContext], str] | None = None


def _no_model(options: Any) -> str | None:
    return None


def _no_tokenizer(options: Any, context: BuildContext) -> str | None:
    return None


def _no_top_k(options: Any) -> int:
    return 0


@attrs.frozen(kw_only=True)
class SamplerSpec(ComponentSpec):
    """A student sampler: generates rollouts and reports their behaviour-policy logprobs."""


@attrs.frozen(kw_only=True)
class TeacherSpec(ComponentSpec):
    """A teacher scorer.

    ``model_of(options)`` names the model the teacher serves: its default name and route value.
    ``tokenizer_of(options, context)`` says where its tokenizer can be loaded from, so a vocabulary
    that differs from the student's is a config error (``distill-run validate`` catches it).
    ``signals`` are the teacher signals it can produce (a remote teacher has no hidden states).
    """

    model_of: Callable[[Any], str | None] = _no_model
    tokenizer_of: Callable[[Any, BuildContext], str | None] = _no_tokenizer
    signals: frozenset[str] = frozenset({"logprobs", "topk"})


@attrs.frozen(kw_only=True)
class RouterSpec(ComponentSpec):
    """Decides which teacher(s) score each row; ``multi_teacher`` routers may name several."""

    multi_teacher: bool = False


@attrs.frozen(kw_only=True)
class LossSpec(ComponentSpec):
    """A training objective and the teacher signal it needs.

    ``top_k(options)`` is the number of teacher candidates per position the loss needs (0 for
    none); teachers' config checks read it as ``context.top_k``.
    """

    teacher_signal: TeacherSignal
    top_k: Callable[[Any], int] = _no_top_k


@attrs.frozen(kw_only=True)
class BlenderSpec(ComponentSpec):
    """Combines several teachers' top-K distributions into one target."""


@attrs.frozen(kw_only=True)
class CheckpointBackendSpec(ComponentSpec):
    """Stores and restores resumable training state and the final student."""


@attrs.frozen(kw_only=True)
class MetricSinkSpec(ComponentSpec):
    """Receives one metrics mapping per step."""


@attrs.frozen(kw_only=True)
class TrainerSpec(ComponentSpec):
    """A trainer backend: owns the student and its optimizer, takes one step per batch."""


@attrs.frozen(kw_only=True)
class TeacherRef:
    """One ``[[teachers]]`` entry as the rest of the run addresses it.

    ``name`` keys metrics and pools (its ``name``, else ``route_value``, else its model);
    ``route_value`` is the value of a row's route field that selects it; ``prompt_key`` the row
    field holding the prompt it sees; ``path`` where it sits in the config (``teachers[1]``).
    """

    name: str
    route_value: str
    prompt_key: str
    blend_weight: float
    backend: str
    path: str
    options: Any = None


@attrs.frozen(kw_only=True)
class BuildContext:
    """What a factory (and a config-time check) may use.

    ``teachers`` are the resolved teacher entries, ``top_k`` the teacher candidates the loss needs,
    ``teacher_signal`` the signal it trains on, ``path`` where the component being built or checked
    sits in the config (a teacher's factory and check find their own entry as :attr:`teacher`).
    ``student`` is the live student module owned by the trainer (a local sampler shares it, so
    weight sync is free); ``tokenizer`` renders prompts for everyone, so all components work on ids.
    A trainer's factory alone gets ``student_path`` (the weights to start from: the student's
    folder, or the checkpoint's on resume), ``objective`` (the built loss) and
    ``kernel_for(device_type, dtype)`` (the loss kernel plugins choose for where it computes).
    Config-time checks see none of these.
    """

    run_config: Any
    output_dir: Path
    seed: int
    device: str
    teachers: tuple[TeacherRef, ...] = ()
    top_k: int = 0
    teacher_signal: TeacherSignal = "logprobs"
    path: str = ""
    tokenizer: Any = None
    student: Any = None
    student_path: str | None = None
    objective: Any = None
    kernel_for: Callable[[str, str], Any] | None = None

    @property
    def teacher(self) -> TeacherRef | None:
        """The ``[[teachers]]`` entry being built or checked (the one at ``path``), else None."""
        return next((ref for ref in self.teachers if ref.path == self.path), None)


@attrs.frozen(kw_only=True)
class PromptRow:
    """A validated dataset row, with its prompts already rendered to token ids.

    ``index`` is the 1-based line number in the source file, so every message can point at it.
    ``teacher_prompts`` holds, per ``teacher_messages_key``, the prompt a teacher reading that key
    sees (privileged context); a key absent there means the teacher sees the student's prompt.
    ``metadata`` keeps every other field of the row, the route field (``teacher``) included.
    """

    index: int
    messages: tuple[dict[str, Any], ...]
    prompt_ids: tuple[int, ...]
    teacher_prompts: Mapping[str, tuple[int, ...]] = attrs.field(factory=dict)
    expected_answer: str | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)

    def teacher_prompt_ids(self, key: str = "teacher_messages") -> tuple[int, ...]:
        return self.teacher_prompts.get(key, self.prompt_ids)


@attrs.frozen(kw_only=True)
class SamplingParams:
    """Explicit sampling settings: nothing is left to a library default."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1


@attrs.frozen(kw_only=True, eq=False)
class Rollout:
    """One sampled completion of one prompt.

    ``sampling_logprobs_C`` are logprobs of the behaviour policy (after temperature and filters),
    ``model_logprobs_C`` the raw model's; they are equal at temperature 1 with no filters.
    ``finished`` is True when the completion ended with EOS, False when cut at max_new_tokens.
    """

    row: PromptRow
    completion_ids_C: torch.Tensor
    sampling_logprobs_C: torch.Tensor
    model_logprobs_C: torch.Tensor
    finished: bool

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.row.prompt_ids


@attrs.frozen(kw_only=True, eq=False)
class ScoreRequest:
    """Score ``completion_ids`` as a continuation of ``prompt_ids`` (the teacher's own prompt).

    Both are tuples of Python ints, vocabulary ids of the student's (and so the teacher's)
    tokenizer; ``prompt_ids`` has at least one id, ``completion_ids`` at least one.
    """

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]


@attrs.frozen(kw_only=True, eq=False)
class TeacherScores:
    """A teacher's view of one completion: logprob of each sampled token, optionally its top-K, and
    for full-vocabulary losses its final hidden states at the completion positions with its output
    head (``hidden_C_G``, ``head_V_G``: the [V, G] weight itself, shared, never copied).

    ``logprobs_C`` and ``topk_logprobs_C_K`` are floating point CPU tensors (float32 is what the
    batch holds), ``topk_ids_C_K`` a ``torch.long`` CPU tensor; ``hidden_C_G`` and ``head_V_G`` stay
    on the teacher's device, in its dtype. The pool checks every result before it is used.
    """

    logprobs_C: torch.Tensor
    topk_ids_C_K: torch.Tensor | None = None
    topk_logprobs_C_K: torch.Tensor | None = None
    hidden_C_G: torch.Tensor | None = None
    head_V_G: torch.Tensor | None = None


@attrs.frozen
class ScoreFailure:
    """In place of :class:`TeacherScores` when a request failed for good: its rollout is dropped
    and counted as ``teacher_failed:<reason>``, never trained on misaligned."""

    reason: str


@attrs.frozen
class WeightedScores:
    """One teacher's scores of one completion and the weight it carries in a blend."""

    teacher: str
    weight: float
    scores: TeacherScores


@attrs.frozen(kw_only=True)
class RunInfo:
    """What observers learn about the run that calls them."""

    config: Any
    output_dir: Path
