"""Run configuration: TOML -> frozen attrs classes through one strict cattrs converter.

Core sections are structured here; component sections (``[sampler]``, ``[[teachers]]``,
``[loss]``, ``[router]``, ``[checkpoint]``, ``[metrics.<sink>]``) keep a few common keys and hand
the rest to the selected component's ``config_cls``. Every problem is collected and reported at
once, each with its path (``must be > 0, got 0 @ train.steps``).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import math
import re
import tomllib
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import attrs
import cattrs
from cattrs.cols import (
    homogenous_tuple_structure_factory,
    is_mutable_sequence,
    is_sequence,
    list_structure_factory,
)
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

from distill.errors import ConfigError, DistillError, UnknownComponentError
from distill.types import BuildContext, SamplingParams, TeacherRef

if TYPE_CHECKING:
    from distill.kinds import Kind
    from distill.manager import PluginManager

__all__ = [
    "StudentConfig",
    "SamplingConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "SamplerConfig",
    "TeacherConfig",
    "RouterConfig",
    "BlenderConfig",
    "LossConfig",
    "TrainerConfig",
    "CheckpointConfig",
    "MetricsConfig",
    "RunConfig",
    "converter",
    "load_config",
    "parse_config",
    "apply_overrides",
    "display_config",
    "resolve_path",
    "resolve_teachers",
    "config_context",
    "TRAJECTORY_FIELDS",
    "RESUMABLE_FIELDS",
    "trajectory_changes",
    "resumable",
    "device_type",
    "positive",
    "non_negative",
    "finite",
    "unit_interval",
]


# -- validators: messages read "must be …, got …"; the path is appended by the collector ----------


def positive(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"must be > 0, got {value!r}")


def non_negative(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"must be >= 0, got {value!r}")


def finite(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not math.isfinite(value):
        raise ValueError(f"must be finite, got {value!r}")


def unit_interval(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {value!r}")


def _not_blank(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    """An empty path would quietly mean the working directory."""
    if not value.strip():
        raise ValueError(f"must not be empty, got {value!r}")


def _betas(_inst: Any, attribute: attrs.Attribute, value: tuple[float, float]) -> None:
    if not all(0.0 <= beta < 1.0 for beta in value):
        raise ValueError(f"must be two numbers in [0, 1), got {list(value)!r}")


def _seed(_inst: Any, attribute: attrs.Attribute, value: int) -> None:
    """Steps derive their seeds as ``seed * 1_000_003 + step``: these must stay within torch's
    64-bit seed range, which [0, 2**32) leaves ample room for."""
    if not 0 <= value < 2**32:
        raise ValueError(f"must be in [0, 2**32), got {value!r}")


def _distinct(_inst: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    """A component listed twice is built twice (a metric sink would write every line twice)."""
    if len(set(value)) != len(value):
        raise ValueError(f"must list each name once, got {list(value)!r}")


def _field(default: Any = attrs.NOTHING, *validators: Any, **kwargs: Any) -> Any:
    return attrs.field(default=default, validator=list(validators), **kwargs)


# -- core sections ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class StudentConfig:
    """The model being trained, in Hugging Face format (a local folder or a hub id)."""

    model: str = _field(attrs.NOTHING, _not_blank)
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"


@attrs.frozen(kw_only=True)
class SamplingConfig:
    """How the student samples its rollouts (explicit: no library default applies)."""

    max_new_tokens: int = _field(64, positive)
    temperature: float = _field(1.0, finite, positive)
    top_k: int = _field(0, non_negative)
    top_p: float = _field(1.0, unit_interval)

    def params(self, *, n: int, max_new_tokens: int | None = None) -> SamplingParams:
        """These settings for ``n`` completions per prompt (evaluation may cap the length)."""
        return SamplingParams(max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, n=n)


@attrs.frozen(kw_only=True)
class DataConfig:
    train: str = _field(attrs.NOTHING, _not_blank)
    eval: str | None = None
    max_prompt_tokens: int | None = _field(None, positive)
    shuffle: bool = True


@attrs.frozen(kw_only=True)
class TrainConfig:
    steps: int = _field(100, positive)
    prompt_groups_per_step: int = _field(16, positive)
    completions_per_prompt: int = _field(4, positive)
    micro_batch_size: int = _field(64, positive)
    learning_rate: float = _field(1e-4, finite, positive)
    weight_decay: float = _field(0.0, finite, non_negative)
    adam_betas: tuple[float, float] = _field((0.9, 0.999), _betas)
    adam_eps: float = _field(1e-8, positive)
    warmup_steps: int = _field(0, non_negative)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float = _field(1.0, finite, non_negative)  # 0 turns clipping off
    threads: int | None = _field(None, positive)
    max_staleness: Literal[0, 1] = 0  # 1: sample and score step k+1 while step k trains

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate for optimizer step ``step`` (0-based); every trainer
        backend follows it."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@attrs.frozen(kw_only=True)
class EvalConfig:
    every_steps: int = _field(0, non_negative)
    max_new_tokens: int | None = _field(None, positive)
    answer_pattern: str | None = attrs.field(default=None)
    limit: int | None = _field(None, positive)
    at_start: bool = True

    @answer_pattern.validator
    def _compiles(self, attribute: attrs.Attribute, value: str | None) -> None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"must be a regular expression ({exc}), got {value!r}") from None


# -- component sections: common keys here, the rest in ``options`` (the component's config_cls) --


@attrs.frozen(kw_only=True)
class SamplerConfig:
    backend: str = "hf"
    options: Any = None


@attrs.frozen(kw_only=True)
class TeacherConfig:
    backend: str = "hf"
    name: str | None = None
    tokenizer: str | None = None
    route_value: str | None = None
    teacher_messages_key: str = "teacher_messages"
    blend_weight: float = _field(1.0, finite, non_negative)
    options: Any = None


@attrs.frozen(kw_only=True)
class RouterConfig:
    name: str = "auto"
    options: Any = None


@attrs.frozen(kw_only=True)
class BlenderConfig:
    name: str = "probability_union"
    options: Any = None


@attrs.frozen(kw_only=True)
class LossConfig:
    name: str = "sampled_reverse_kl"
    kernel: str = "auto"
    normalize: Literal["token", "sequence", "sum"] = "token"
    options: Any = None


@attrs.frozen(kw_only=True)
class TrainerConfig:
    backend: str = "torch"
    options: Any = None


@attrs.frozen(kw_only=True)
class CheckpointConfig:
    backend: str = "local"
    every_steps: int = _field(0, non_negative)
    options: Any = None


@attrs.frozen(kw_only=True)
class MetricsConfig:
    sinks: tuple[str, ...] = _field(("jsonl",), _distinct)
    options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class RunConfig:
    """A whole run. ``source`` is the TOML file it came from (paths resolve next to it)."""

    student: StudentConfig
    data: DataConfig
    teachers: tuple[TeacherConfig, ...] = attrs.field()
    output_dir: str = _field("runs/distill", _not_blank)
    seed: int = _field(0, _seed)
    sampling: SamplingConfig = attrs.field(factory=SamplingConfig)
    train: TrainConfig = attrs.field(factory=TrainConfig)
    eval: EvalConfig = attrs.field(factory=EvalConfig)
    sampler: SamplerConfig = attrs.field(factory=SamplerConfig)
    router: RouterConfig = attrs.field(factory=RouterConfig)
    blender: BlenderConfig = attrs.field(factory=BlenderConfig)
    loss: LossConfig = attrs.field(factory=LossConfig)
    trainer: TrainerConfig = attrs.field(factory=TrainerConfig)
    checkpoint: CheckpointConfig = attrs.field(factory=CheckpointConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    source: str | None = None

    @teachers.validator
    def _some_teacher(self, attribute: attrs.Attribute, value: tuple[TeacherConfig, ...]) -> None:
        if not value:
            raise ValueError("must list at least one teacher ([[teachers]])")


# -- what a resume checks: every field is in exactly one of the two lists (a test holds this) ------

TRAJECTORY_FIELDS: tuple[str, ...] = (
    "seed",
    "student.model", "student.tokenizer", "student.dtype",
    "data.train", "data.max_prompt_tokens", "data.shuffle",
    "eval.max_new_tokens",  # it also caps the prompt length of training rows (room left in the context)
    "teachers", "sampler", "router", "blender", "trainer",
    "sampling",
    "loss.name", "loss.normalize", "loss.options",
    "train.steps",  # the learning-rate schedule spans them
    "train.prompt_groups_per_step", "train.completions_per_prompt", "train.max_staleness",
    "train.learning_rate", "train.weight_decay", "train.adam_betas", "train.adam_eps",
    "train.warmup_steps", "train.schedule", "train.max_grad_norm",
)
"""What a run trains on and how it updates, by dotted path (a section means all of it). Resuming a
checkpoint under other values would splice two experiments into one, so a resume refuses that."""

RESUMABLE_FIELDS: tuple[str, ...] = (
    "output_dir", "source", "checkpoint", "metrics",
    "data.eval", "eval.every_steps", "eval.answer_pattern", "eval.limit", "eval.at_start",
    "student.device", "train.threads", "train.micro_batch_size", "loss.kernel",
)
"""What may change on resume: where the run writes, what it evaluates and reports, and where and in
how many pieces it computes (which moves only the last bits of the arithmetic)."""


RESUMABLE = "distill_resumable"  # the metadata key :func:`resumable` sets


def resumable(**field_args: Any) -> Any:
    """An options field (``attrs.field`` arguments) a resumed run may change inside a trajectory
    section: where or how a component connects or computes (a server's URL, timeouts, concurrency,
    a device, a batch size), never what the run trains."""
    metadata = {**field_args.pop("metadata", {}), RESUMABLE: True}
    return attrs.field(**field_args, metadata=metadata)


def _resumable_paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The paths (keys and list indices, as :func:`display_config` nests them) of every field
    declared with :func:`resumable` in ``node``'s attrs tree."""
    if attrs.has(type(node)):
        for field in attrs.fields(type(node)):
            if field.metadata.get(RESUMABLE):
                yield (*path, field.name)
            else:
                yield from _resumable_paths(getattr(node, field.name), (*path, field.name))
    elif isinstance(node, (list, tuple)):
        for index, item in enumerate(node):
            yield from _resumable_paths(item, (*path, index))


def _drop(node: Any, path: tuple[Any, ...]) -> None:
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def trajectory_changes(saved: Mapping[str, Any], config: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{path: (saved value, config's value)}`` for each trajectory field that differs between
    ``saved`` (the :func:`display_config` a checkpoint recorded, read back from JSON) and ``config``,
    leaving out the options plugins declared :func:`resumable`."""
    now = json.loads(json.dumps(display_config(config)))  # as JSON holds it: tuples become lists
    saved = copy.deepcopy(dict(saved))
    for path in _resumable_paths(config):
        _drop(now, path)
        _drop(saved, path)

    def get(node: Any, path: str) -> Any:
        for key in path.split("."):
            node = node.get(key) if isinstance(node, Mapping) else None
        return node

    return {path: (get(saved, path), get(now, path)) for path in TRAJECTORY_FIELDS
            if get(saved, path) != get(now, path)}


# -- the converter ------------------------------------------------------------------------------


def _strict(kind: type, accepts: tuple[type, ...]) -> Any:
    def structure(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) and kind is not bool or not isinstance(value, accepts):
            raise TypeError(f"must be {kind.__name__}, got {value!r}")
        return kind(value)

    return structure


def _literal(value: Any, type_: Any) -> Any:
    choices = get_args(type_)
    if value not in choices:
        raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _is_list(type_: Any) -> bool:
    return is_sequence(type_) or get_origin(type_) is tuple


def _list_only(type_: Any, conv: cattrs.Converter) -> Any:
    """cattrs' hook for a list or tuple type, refusing anything but a list: it would take a string
    or a table apart into its characters or keys (``columns = "loss"`` -> ``('l', 'o', 's', 's')``)."""
    args = get_args(type_)
    fixed = get_origin(type_) is tuple and args and args[-1] is not Ellipsis
    if fixed:
        base = conv.gen_structure_hetero_tuple(type_)
    elif is_mutable_sequence(type_):
        base = list_structure_factory(type_, conv)
    else:
        base = homogenous_tuple_structure_factory(type_, conv)

    def structure(value: Any, type_: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            example = f"; write [{json.dumps(value)}]" if isinstance(value, str) and str in args else ""
            raise TypeError(f"must be a list, got {value!r}{example}")
        if fixed and len(value) != len(args):
            raise TypeError(f"must be a list of {len(args)} values, got {value!r}")
        return base(value, type_)

    return structure


def _table_only(type_: Any, conv: cattrs.Converter) -> Any:
    """cattrs' hook for a config class, refusing anything but a table with a message that says so."""
    base = conv.gen_structure_attrs_fromdict(type_)

    def structure(value: Any, type_: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"must be a table, got {value!r}")
        return base(value, type_)

    return structure


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _strict(int, (int,)))
    conv.register_structure_hook(float, _strict(float, (int, float)))
    conv.register_structure_hook(str, _strict(str, (str,)))
    conv.register_structure_hook(bool, _strict(bool, (bool,)))
    conv.register_structure_hook_func(
        lambda t: getattr(t, "__origin__", None) is Literal, _literal
    )
    conv.register_structure_hook_factory(_is_list, _list_only)
    conv.register_structure_hook_factory(attrs.has, _table_only)
    return conv


converter = _make_converter()
"""The one converter for run configs and component options: strict types, no unknown keys."""


def _unknown_keys(keys: Collection[str], known: Collection[str], path: str) -> list[str]:
    """One problem per unknown key, naming the closest known key: usually it is a typo."""
    problems = []
    for key in sorted(keys):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        problems.append(f"unknown key '{key}'{hint} @ {path or '(top level)'}")
    return problems


def _messages(exc: BaseException, path: str, also_known: Collection[str] = ()) -> list[str]:
    """Flatten a cattrs error tree into 'message @ path' lines. ``also_known`` are keys of the
    same table that the core took out before structuring (a component section's common keys)."""
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [f.name for f in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        return _unknown_keys(exc.extra_fields, [*known, *also_known], path)
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        out: list[str] = []
        for sub in exc.exceptions:
            notes = getattr(sub, "__notes__", [])
            note = next(
                (n for n in notes if isinstance(n, (AttributeValidationNote, IterableValidationNote))),
                None,
            )
            if isinstance(note, AttributeValidationNote):
                out.extend(_messages(sub, f"{path}.{note.name}" if path else note.name))
            elif isinstance(note, IterableValidationNote):
                out.extend(_messages(sub, f"{path}[{note.index}]"))
            else:  # the table itself: its unknown keys
                out.extend(_messages(sub, path, also_known))
        return out
    if isinstance(exc, KeyError):
        return [f"required key missing @ {path}"]
    return [f"{exc} @ {path or '(top level)'}"]


def _validate(obj: Any, path: str) -> list[str]:
    """Run attrs validators field by field (structured with validators off) to get every error."""
    problems: list[str] = []
    if attrs.has(type(obj)):
        for field in attrs.fields(type(obj)):
            value = getattr(obj, field.name)
            here = f"{path}.{field.name}" if path else field.name
            if field.validator is not None:
                try:
                    field.validator(obj, field, value)
                except (ValueError, TypeError) as exc:
                    problems.append(f"{exc} @ {here}")
            problems.extend(_validate(value, here))
    elif isinstance(obj, tuple):
        for i, item in enumerate(obj):
            problems.extend(_validate(item, f"{path}[{i}]"))
    return problems


def structure(data: Any, cls: type, path: str = "", also_known: Collection[str] = ()) -> tuple[Any, list[str]]:
    """Structure ``data`` as ``cls``; return (object or None, every problem with its path)."""
    with attrs.validators.disabled():
        try:
            obj = converter.structure(data, cls)
        except (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError) as exc:
            return None, _messages(exc, path, also_known)
        except (TypeError, ValueError) as exc:
            return None, [f"{exc} @ {path or '(top level)'}"]
    return obj, _validate(obj, path)


# -- loading -------------------------------------------------------------------------------------


def _split(section: Any, common: frozenset[str]) -> tuple[Any, dict[str, Any]]:
    if not isinstance(section, dict):
        return section, {}
    head = {k: v for k, v in section.items() if k in common}
    rest = {k: v for k, v in section.items() if k not in common}
    return head, rest


@attrs.frozen
class _Entry:
    """One component named in the config: where it sits, its kind, and its raw options."""

    kind: Kind
    path: str
    index: int | None  # position in a ``list`` section
    rest: dict[str, Any]


def parse_config(
    raw: Mapping[str, Any], manager: PluginManager, *, source: str | None = None
) -> RunConfig:
    """Build a :class:`RunConfig` from a parsed TOML mapping, or raise :class:`ConfigError`.

    Every component section is split (by the kinds table) into the core's common keys and the
    options of the component it selects; each is structured with the component's ``config_cls``.
    """
    registry = manager.registry
    raw = dict(raw)
    problems = ["unknown key 'source' @ (top level)"] if "source" in raw else []
    raw.pop("source", None)
    entries: list[_Entry] = []
    for kind in registry.kinds:
        section = raw.get(kind.section, {})
        if kind.shape == "list" and isinstance(section, list):
            heads = []
            for i, item in enumerate(section):
                head, rest = _split(item, kind.common_keys)
                heads.append(head)
                entries.append(_Entry(kind, f"{kind.section}[{i}]", i, rest))
            raw[kind.section] = heads
        elif kind.shape != "list" and isinstance(section, dict):
            head, rest = _split(section, kind.common_keys)
            raw[kind.section] = head
            entries.append(_Entry(kind, kind.section, None, rest))
    config, structure_problems = structure(raw, registry.run_config)
    problems += structure_problems
    if config is None:
        raise ConfigError(problems, source)

    checks: list[tuple[Any, Any, str]] = []
    with attrs.validators.disabled():  # each problem is reported once, by structure()
        for entry in entries:
            config, found = _structure_entry(config, entry, manager, checks)
            problems.extend(found)
        context = config_context(config, manager)
    problems.extend(_check_teacher_names(context))
    problems.extend(_check_teacher_signals(context, manager))
    problems.extend(_check_multi_teacher(config, manager))
    problems.extend(_check_loss_kernel(config, manager))
    if problems:
        raise ConfigError(problems, source)
    config = attrs.evolve(config, source=source)
    context = config_context(config, manager)
    for spec, options, path in checks:
        if spec.check is not None:
            problems.extend(spec.check(options, attrs.evolve(context, path=path)))
    if problems:
        raise ConfigError(problems, source)
    return config


def _structure_entry(
    config: RunConfig, entry: _Entry, manager: PluginManager, checks: list[tuple[Any, Any, str]]
) -> tuple[RunConfig, list[str]]:
    """Structure one component's options into ``config`` (a ``names`` kind: every name it lists)."""
    kind, problems = entry.kind, []
    section = getattr(config, kind.section)
    if kind.shape == "names":
        selected = getattr(section, kind.selector)
        for extra in set(entry.rest) - set(selected):
            problems.append(f"options given for {kind.label} '{extra}' which is not in "
                            f"{kind.section}.{kind.selector} @ {kind.section}.{extra}")
        options = {}
        for name in selected:
            spec, found = _lookup(manager, kind, name, f"{kind.section}.{kind.selector}")
            if spec is not None:
                options[name], found = structure(entry.rest.get(name, {}), spec.config_cls, f"{kind.section}.{name}")
                checks.append((spec, options[name], f"{kind.section}.{name}"))
            problems.extend(found)
        return attrs.evolve(config, **{kind.section: attrs.evolve(section, options=options)}), problems
    item = section[entry.index] if kind.shape == "list" else section
    spec, problems = _lookup(manager, kind, getattr(item, kind.selector), f"{entry.path}.{kind.selector}")
    if spec is not None and spec.delegate is not None:
        item = attrs.evolve(item, **{kind.selector: spec.delegate(config_context(config, manager))})
        spec, problems = _lookup(manager, kind, getattr(item, kind.selector), f"{entry.path}.{kind.selector}")
    if spec is None:
        return config, problems
    options, problems = structure(entry.rest, spec.config_cls, entry.path, kind.common_keys)
    checks.append((spec, options, entry.path))
    item = attrs.evolve(item, options=options)
    if kind.shape == "list":
        item = (*section[: entry.index], item, *section[entry.index + 1 :])
    return attrs.evolve(config, **{kind.section: item}), problems


def _lookup(manager: PluginManager, kind: Kind, name: str, path: str) -> tuple[Any, list[str]]:
    try:
        return manager.get(kind.name, name), []
    except UnknownComponentError as exc:  # reported with its path; parsing goes on
        return None, [f"{exc} @ {path}"]


def resolve_teachers(config: RunConfig, manager: PluginManager) -> tuple[TeacherRef, ...]:
    """The one place teachers get their names and route values: ``name``, else ``route_value``,
    else the model its backend says it serves (``TeacherSpec.model_of``), else its config path."""
    refs = []
    for index, teacher in enumerate(config.teachers):
        model = None
        if teacher.options is not None:
            with contextlib.suppress(UnknownComponentError):
                model = manager.get("teacher", teacher.backend).model_of(teacher.options)
        route = teacher.route_value or model or f"teachers[{index}]"
        refs.append(TeacherRef(name=teacher.name or route, route_value=route,
                               prompt_key=teacher.teacher_messages_key, blend_weight=teacher.blend_weight,
                               backend=teacher.backend, path=f"teachers[{index}]", options=teacher.options))
    return tuple(refs)


def config_context(config: RunConfig, manager: PluginManager, **built: Any) -> BuildContext:
    """The :class:`BuildContext` of ``config``; ``built`` adds what exists once a run loads models
    (``tokenizer``, ``student``). Config-time checks get it without them."""
    top_k, signal = 0, "logprobs"
    with contextlib.suppress(UnknownComponentError):
        loss = manager.get("loss", config.loss.name)
        signal = loss.teacher_signal
        top_k = loss.top_k(config.loss.options) if config.loss.options is not None else 0
    return BuildContext(run_config=config, output_dir=Path(config.output_dir), seed=config.seed,
                        device=config.student.device, teachers=resolve_teachers(config, manager),
                        top_k=top_k, teacher_signal=signal, **built)


def _check_teacher_names(context: BuildContext) -> list[str]:
    """Teachers are addressed by name (routes, metrics): two with one name would shadow each other."""
    seen: dict[str, str] = {}
    problems = []
    for teacher in context.teachers:
        if teacher.name in seen:
            problems.append(
                f"teacher name '{teacher.name}' is already used by {seen[teacher.name]}; give one of "
                f"them a distinct `name` @ {teacher.path}"
            )
        seen.setdefault(teacher.name, teacher.path)
    return problems


_SIGNALS = {"logprobs": "per-token logprobs", "topk": "top-K candidates",
            "hidden": "hidden states and output head (its whole distribution)"}


def _check_teacher_signals(context: BuildContext, manager: PluginManager) -> list[str]:
    """Every teacher must produce the signal the loss trains on (a remote one has no hidden states)."""
    problems = []
    for teacher in context.teachers:
        try:
            spec = manager.get("teacher", teacher.backend)
        except UnknownComponentError:
            continue  # reported with its path already
        if context.teacher_signal not in spec.signals:
            problems.append(
                f"loss '{context.run_config.loss.name}' needs the teacher's {_SIGNALS[context.teacher_signal]}, "
                f"which teacher backend '{spec.name}' does not provide (it gives "
                f"{', '.join(_SIGNALS[s] for s in sorted(spec.signals))}); use a local teacher (backend 'hf') or "
                f"a loss such as sampled_reverse_kl or topk_forward_kl @ {teacher.path}.backend"
            )
    return problems


def _check_multi_teacher(config: RunConfig, manager: PluginManager) -> list[str]:
    """A router that sends a row to several teachers needs a loss whose targets can be blended."""
    try:
        router = manager.get("router", config.router.name)
        loss = manager.get("loss", config.loss.name)
    except UnknownComponentError:
        return []  # reported with its path already
    if router.multi_teacher and loss.teacher_signal != "topk":
        return [
            f"router '{router.name}' has several teachers score each row, which needs a top-K loss "
            f"to blend them (e.g. topk_forward_kl); loss '{loss.name}' trains on one teacher's "
            f"logprobs: use router 'routed' @ router.name"
        ]
    return []


def _check_loss_kernel(config: RunConfig, manager: PluginManager) -> list[str]:
    """``loss.kernel`` must name a kernel some plugin provides for this loss, device and dtype."""
    try:
        manager.select_loss_kernel(loss=config.loss.name, kernel=config.loss.kernel,
                                   device=device_type(config.student.device), dtype=config.student.dtype)
    except DistillError as exc:
        return [f"{exc} @ loss.kernel"]
    return []


def device_type(device: str) -> str:
    """``cuda:1`` -> ``cuda``: kernels are chosen per device type."""
    return device.split(":", 1)[0]


def _parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-4``, ``true``, ``"x"``, ``[1, 2]``); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _child(node: Any, key: str) -> Any:
    """``node[key]`` of a table, or of a list by its index; None when there is none."""
    if isinstance(node, dict):
        return node.get(key)
    if isinstance(node, list) and key.isdigit() and int(key) < len(node):
        return node[int(key)]
    return None


def _unset(raw: dict[str, Any], dotted: str) -> list[str]:
    """Remove ``dotted`` (``loss.ratio_log_cap``, ``teachers.1``); a problem if it is not there,
    since a misspelt key would otherwise leave the value it meant to remove."""
    *parents, leaf = dotted.strip().split(".")
    node: Any = raw
    for part in parents:
        node = _child(node, part)
    if _child(node, leaf) is None:
        return [f"no key {dotted!r} to unset @ --unset"]
    del node[leaf if isinstance(node, dict) else int(leaf)]
    return []


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], unset: Sequence[str] = ()) -> dict[str, Any]:
    """Remove the ``unset`` keys, then apply ``section.key=value`` overrides (``teachers.0.model=…``
    indexes lists). Unsetting first lets ``--unset loss --set loss.name=…`` replace a whole table."""
    problems = [problem for dotted in unset for problem in _unset(raw, dotted)]
    for item in overrides:
        dotted, sep, text = item.partition("=")
        if not sep or not dotted.strip():
            problems.append(f"override {item!r} is not KEY=VALUE @ --set")
            continue
        *parents, leaf = dotted.strip().split(".")
        node: Any = raw
        for part in parents:
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(f"no list item {part} for override {item!r} @ --set")
                    break
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                problems.append(f"{dotted!r} goes through a non-table value @ --set")
                break
        else:
            if isinstance(node, list):
                if not leaf.isdigit() or int(leaf) >= len(node):
                    problems.append(f"no list item {leaf} for override {item!r} @ --set")
                    continue
                node[int(leaf)] = _parse_value(text)
            else:
                node[leaf] = _parse_value(text)
    if problems:
        raise ConfigError(problems)
    return raw


def load_config(
    path: str | Path, manager: PluginManager, overrides: Sequence[str] = (), unset: Sequence[str] = ()
) -> RunConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except IsADirectoryError:
        raise ConfigError([f"config file {path} is a folder; give the TOML file in it"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None
    try:
        raw = apply_overrides(raw, overrides, unset)
    except ConfigError as error:
        raise ConfigError(error.problems, str(path)) from None
    return parse_config(raw, manager, source=str(path))


def resolve_path(value: str, config: RunConfig | None) -> str:
    """A relative path is looked up next to the config file first, then in the working directory.

    Values that exist in neither place (a hub id, a file still to be written) are returned as is.
    """
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    source = getattr(config, "source", None)
    if source is not None:
        beside = Path(source).parent / candidate
        if beside.exists():
            return str(beside)
    return str(candidate)


_SECRET_KEY = re.compile(r"(api_?key|secret|password|auth_token|hf_token)$", re.IGNORECASE)


def display_config(config: RunConfig) -> dict[str, Any]:
    """The config as plain data for humans and logs, with any secret-looking value masked."""

    def mask(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: "***" if isinstance(v, str) and v and _SECRET_KEY.search(k) else mask(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [mask(v) for v in node]
        return node

    return mask(converter.unstructure(config))
