"""One exception hierarchy: every message says what went wrong, where, and what to do next."""

from __future__ import annotations

__all__ = [
    "DistillError",
    "ConfigError",
    "PluginError",
    "PluginLoadError",
    "ComponentConflictError",
    "UnknownComponentError",
    "DataError",
    "CheckpointError",
]


class DistillError(Exception):
    """Base of every error distill raises on purpose."""


class ConfigError(DistillError):
    """A run config is invalid. Carries every problem found, each with its path."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} config error(s){where}:\n{lines}")


class PluginError(DistillError):
    """A plugin could not be used."""


class PluginLoadError(PluginError):
    """A plugin's entry point failed to import or register."""


class ComponentConflictError(PluginError):
    """Two plugins registered a component of the same kind under the same name."""


class UnknownComponentError(PluginError):
    """Config names a component no installed plugin provides."""


class DataError(DistillError):
    """The dataset cannot feed a run (missing file, or no usable row)."""


class CheckpointError(DistillError):
    """A checkpoint cannot be written or resumed from."""
