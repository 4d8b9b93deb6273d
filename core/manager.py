"""The one typed facade over pluggy: discovery, provenance, component lookup and hook calls."""

from __future__ import annotations

import difflib
import os
import types
import warnings
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

import attrs
import pluggy

from distill.errors import (
    ComponentConflictError,
    PluginError,
    PluginLoadError,
    UnknownComponentError,
)
from distill.hookspecs import PROJECT_NAME
from distill.kinds import REGISTRY, Kind, Registry
from distill.protocols import missing_members
from distill.types import ComponentSpec, RunInfo

__all__ = ["ENTRY_POINT_GROUP", "DISABLE_ENV", "PluginInfo", "PluginManager"]

ENTRY_POINT_GROUP = "distill.plugins"
DISABLE_ENV = "DISTILL_DISABLE_PLUGINS"
RENAMED_PLUGINS = {"cuda_losses": "fused_losses"}  # old entry-point name -> new, for --disable-plugin


@attrs.frozen
class PluginInfo:
    """Where a plugin came from and what it provides."""

    name: str
    distribution: str | None
    version: str | None
    components: tuple[tuple[str, str], ...] = ()

    @property
    def provenance(self) -> str:
        if self.distribution is None:
            return f"plugin '{self.name}' (registered in-process)"
        return f"plugin '{self.name}' (distribution {self.distribution} {self.version})"


@attrs.frozen
class _Provided:
    spec: ComponentSpec
    plugin: PluginInfo


def _renamed(name: str) -> str:
    if name in RENAMED_PLUGINS:
        warnings.warn(f"plugin '{name}' is now called '{RENAMED_PLUGINS[name]}'; disable it by its new name",
                      FutureWarning, stacklevel=3)
    return RENAMED_PLUGINS.get(name, name)


def _origin(plugin: object) -> str:
    """The module a plugin's hooks live in (with the class, for an instance)."""
    if isinstance(plugin, types.ModuleType):
        return f"module {plugin.__name__}"
    return f"{type(plugin).__module__}.{type(plugin).__qualname__}"


def disabled_from_env(environ: Mapping[str, str] = os.environ) -> set[str]:
    """Plugin names listed, comma-separated, in ``DISTILL_DISABLE_PLUGINS``."""
    return {name.strip() for name in environ.get(DISABLE_ENV, "").split(",") if name.strip()}


class PluginManager:
    """Loads plugins and answers "which component is called X?".

    ``load_entry_points=False`` gives an empty manager, as tests and embedders want; plugins can
    then be added with :meth:`register`.
    """

    def __init__(
        self, *, disabled: Iterable[str] = (), load_entry_points: bool = True, registry: Registry = REGISTRY
    ) -> None:
        self.registry = registry
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        for namespace in registry.hookspecs:
            self._pm.add_hookspecs(namespace)
        self._info: dict[str, PluginInfo] = {}
        self._components: dict[str, dict[str, _Provided]] | None = None
        self.disabled = frozenset(_renamed(name) for name in disabled)
        if load_entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.disabled or self._pm.is_blocked(ep.name):
                continue
            dist = ep.dist
            info = PluginInfo(
                ep.name, dist.name if dist else "unknown", dist.version if dist else "unknown"
            )
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginLoadError(
                    f"{info.provenance} failed to import ({ep.value}): "
                    f"{type(exc).__name__}: {exc}. Fix or uninstall {info.distribution}, or "
                    f"disable it with --disable-plugin {ep.name} or {DISABLE_ENV}={ep.name}."
                ) from exc
            self._register(plugin, info)

    def register(self, plugin: object, name: str) -> None:
        """Register an in-process plugin object (a module or an instance with hookimpls)."""
        if name in self.disabled:
            return
        self._register(plugin, PluginInfo(name, None, None))

    def _register(self, plugin: object, info: PluginInfo) -> None:
        try:
            self._pm.register(plugin, name=info.name)
        except ValueError as exc:
            raise PluginLoadError(f"{info.provenance} could not be registered: {exc}") from exc
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(f"{info.provenance} has an invalid hook: {exc}") from exc
        callers = self._pm.get_hookcallers(plugin) or []
        unknown = sorted(caller.name for caller in callers if not caller.has_spec())
        if unknown:  # a misspelt hook name would otherwise be silently ignored
            self._pm.unregister(name=info.name)
            raise PluginLoadError(f"{info.provenance}: {_origin(plugin)} implements "
                                  f"{', '.join(self._unknown_hook(name) for name in unknown)}.")
        if not callers:  # a forgotten @hookimpl: the plugin would silently provide nothing
            unmarked = sorted(name for name in dir(plugin) if name.startswith(f"{PROJECT_NAME}_"))
            hint = f" (no @hookimpl on {', '.join(unmarked)})" if unmarked else ""
            warnings.warn(f"{info.provenance}: {_origin(plugin)} implements no distill hook{hint}, so it "
                          f"provides nothing. Mark its hook functions with @distill.hookimpl.", stacklevel=3)
        self._info[info.name] = info
        self._components = None

    def _unknown_hook(self, name: str) -> str:
        """The unknown hook ``name`` with the hookspec it is closest to, else every hookspec."""
        prefix = f"{PROJECT_NAME}_"  # compared without it, or every name would look alike
        known = sorted(hook for hook, caller in vars(self._pm.hook).items() if caller.has_spec())
        close = difflib.get_close_matches(name.removeprefix(prefix), [k.removeprefix(prefix) for k in known], n=1)
        return f"unknown hook '{name}' " + (f"(did you mean '{prefix}{close[0]}'?)" if close
                                             else f"(hooks: {', '.join(known)})")

    def unregister(self, name: str) -> None:
        self._pm.unregister(name=name)
        self._info.pop(name, None)
        self._components = None

    @property
    def hook(self) -> Any:
        return self._pm.hook

    # -- components -------------------------------------------------------------------------

    def _collect(self) -> dict[str, dict[str, _Provided]]:
        if self._components is not None:
            return self._components
        collected: dict[str, dict[str, _Provided]] = {kind.name: {} for kind in self.registry.kinds}
        provides: dict[str, list[tuple[str, str]]] = {name: [] for name in self._info}
        for kind in self.registry.kinds:
            for impl in getattr(self._pm.hook, kind.hook).get_hookimpls():
                info = self._info[impl.plugin_name]
                for spec in impl.function() or ():
                    if not isinstance(spec, kind.spec_cls):
                        raise PluginError(
                            f"{info.provenance}: {kind.hook}() returned {spec!r}, "
                            f"expected {kind.spec_cls.__name__} objects."
                        )
                    if spec.name in collected[kind.name]:
                        other = collected[kind.name][spec.name].plugin
                        raise ComponentConflictError(
                            f"{kind.label} '{spec.name}' is registered twice: by "
                            f"{other.provenance} and by {info.provenance}. Uninstall or disable "
                            f"one of them (--disable-plugin NAME)."
                        )
                    collected[kind.name][spec.name] = _Provided(spec, info)
                    provides[info.name].append((kind.name, spec.name))
        self._info = {
            name: attrs.evolve(info, components=tuple(provides.get(name, ())))
            for name, info in self._info.items()
        }
        self._components = collected
        return collected

    def components(self, kind: str) -> dict[str, ComponentSpec]:
        """Every component of ``kind`` by name (kinds: sampler, teacher, router, loss, …)."""
        return {name: p.spec for name, p in self._collect()[kind].items()}

    def provider(self, kind: str, name: str) -> PluginInfo:
        return self._collect()[kind][name].plugin

    def get(self, kind: str, name: str) -> Any:
        """The spec of component ``name``; a helpful error if nothing provides it."""
        available = self._collect()[kind]
        key = name.strip().lower().replace("-", "_")
        if key in available:
            return available[key].spec
        listed = ", ".join(sorted(available)) or "none"
        hint = ""
        if self.disabled:
            hint = f" Disabled plugins: {', '.join(sorted(self.disabled))}."
        raise UnknownComponentError(
            f"Unknown {self.registry.kind(kind).label} '{name}'. Available: {listed}.{hint}"
        )

    def build(self, kind: str, name: str, options: Any, context: Any) -> Any:
        """Build component ``name`` of ``kind`` and check the object keeps the kind's protocol."""
        row: Kind = self.registry.kind(kind)
        built = self.get(kind, name).factory(options, context)
        missing = missing_members(built, row.protocol)
        if missing:
            provider = self.provider(kind, name)
            raise PluginError(
                f"{row.label} '{name}' from {provider.provenance} built a {type(built).__name__} "
                f"without {', '.join(f'`{m}`' for m in missing)}. Subclass distill.{row.protocol.__name__} "
                f"for the optional members' defaults and implement the rest."
            )
        return built

    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin with its provenance and the components it registers."""
        self._collect()
        return sorted(self._info.values(), key=lambda info: info.name)

    # -- dispatch and observers ---------------------------------------------------------------

    def select_loss_kernel(self, *, loss: str, kernel: str, device: str, dtype: str) -> Any:
        chosen = self._pm.hook.distill_select_loss_kernel(
            loss=loss, kernel=kernel, device=device, dtype=dtype
        )
        if chosen is None:
            raise UnknownComponentError(
                f"No installed plugin provides loss kernel '{kernel}' for loss '{loss}' on "
                f"{device}/{dtype}. Use loss.kernel = \"auto\" or install the plugin that provides it."
            )
        return chosen

    def on_step_end(self, *, run: RunInfo, step: int, metrics: Mapping[str, Any]) -> None:
        self._pm.hook.distill_on_step_end(run=run, step=step, metrics=metrics)

    def on_checkpoint_saved(self, *, run: RunInfo, step: int, uri: str) -> None:
        self._pm.hook.distill_on_checkpoint_saved(run=run, step=step, uri=uri)
