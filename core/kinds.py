"""The one table of component kinds: each row says everything the core needs to know about a kind.

Adding a kind is a hookspec in :mod:`distill.hookspecs`, a spec class in :mod:`distill.types`, a
config class (and its ``RunConfig`` field) in :mod:`distill.config`, a protocol in
:mod:`distill.protocols`, and a row here. The manager collects specs by the row's hook, the config
parser splits the row's section into common keys and the selected component's options, the loop
checks built objects against the row's protocol, and the docs test reads the same rows.
"""

from __future__ import annotations

from typing import Literal

import attrs

from distill import config, hookspecs, protocols, types

__all__ = ["Kind", "Registry", "KINDS", "REGISTRY"]

Shape = Literal["one", "list", "names"]


@attrs.frozen(kw_only=True)
class Kind:
    """One component kind.

    ``section`` is the ``RunConfig`` field holding it, ``selector`` the key naming the component.
    ``shape``: ``one`` (a table: ``[sampler] backend = …``), ``list`` (an array of tables, one
    component each: ``[[teachers]] backend = …``) or ``names`` (a list of names in ``selector``,
    each with its options in a sub-table: ``[metrics] sinks = [...]``, ``[metrics.jsonl]``).
    """

    name: str
    hook: str
    spec_cls: type[types.ComponentSpec]
    config_cls: type
    protocol: type
    section: str
    selector: str
    shape: Shape = "one"

    @property
    def label(self) -> str:
        """How messages name the kind: ``checkpoint backend``."""
        return self.name.replace("_", " ")

    @property
    def common_keys(self) -> frozenset[str]:
        """Keys of the section that belong to the core; the rest are the component's options."""
        return frozenset(f.name for f in attrs.fields(self.config_cls) if f.name != "options")


@attrs.frozen(kw_only=True)
class Registry:
    """The kinds a plugin manager knows, the ``RunConfig`` class holding their sections, and the
    hookspec namespaces declaring their hooks. Tests extend it with a toy kind."""

    kinds: tuple[Kind, ...]
    run_config: type
    hookspecs: tuple[object, ...] = (hookspecs,)

    def kind(self, name: str) -> Kind:
        return next(k for k in self.kinds if k.name == name)

    def extended(self, kind: Kind, run_config: type, hookspec_namespace: object) -> Registry:
        return Registry(kinds=(*self.kinds, kind), run_config=run_config,
                        hookspecs=(*self.hookspecs, hookspec_namespace))


# Order matters for config parsing: later kinds' checks and delegates see the teachers and the loss.
KINDS: tuple[Kind, ...] = (
    Kind(name="teacher", hook="distill_teachers", spec_cls=types.TeacherSpec, config_cls=config.TeacherConfig,
         protocol=protocols.TeacherScorer, section="teachers", selector="backend", shape="list"),
    Kind(name="loss", hook="distill_losses", spec_cls=types.LossSpec, config_cls=config.LossConfig,
         protocol=protocols.Objective, section="loss", selector="name"),
    Kind(name="sampler", hook="distill_samplers", spec_cls=types.SamplerSpec, config_cls=config.SamplerConfig,
         protocol=protocols.Sampler, section="sampler", selector="backend"),
    Kind(name="router", hook="distill_routers", spec_cls=types.RouterSpec, config_cls=config.RouterConfig,
         protocol=protocols.Router, section="router", selector="name"),
    Kind(name="blender", hook="distill_blenders", spec_cls=types.BlenderSpec, config_cls=config.BlenderConfig,
         protocol=protocols.Blender, section="blender", selector="name"),
    Kind(name="trainer", hook="distill_trainers", spec_cls=types.TrainerSpec, config_cls=config.TrainerConfig,
         protocol=protocols.Trainer, section="trainer", selector="backend"),
    Kind(name="checkpoint_backend", hook="distill_checkpoint_backends", spec_cls=types.CheckpointBackendSpec,
         config_cls=config.CheckpointConfig, protocol=protocols.CheckpointBackend, section="checkpoint",
         selector="backend"),
    Kind(name="metric_sink", hook="distill_metric_sinks", spec_cls=types.MetricSinkSpec,
         config_cls=config.MetricsConfig, protocol=protocols.MetricSink, section="metrics", selector="sinks",
         shape="names"),
)

REGISTRY = Registry(kinds=KINDS, run_config=config.RunConfig)
