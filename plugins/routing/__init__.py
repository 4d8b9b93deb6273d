"""Built-in plugin ``routing``: which teacher scores which row.

* ``single``: every row goes to the one configured teacher.
* ``routed`` (routed MOPD): each row goes to exactly the teacher whose ``route_value`` equals
  ``row[route_key]``; rows with a missing, non-string or unknown value are skipped and counted as
  ``unknown_route:<value>``, or stop the run with ``on_unknown_route = "error"``.
* ``all``: every teacher with a positive ``blend_weight`` scores every row, for top-K blending.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from distill import BuildContext, NoOptions, PromptRow, RouterSpec, hookimpl
from distill.config import RunConfig, route_value, teacher_key
from distill.errors import DistillError
from distill.protocols import SkipRow

__all__ = ["SingleRouter", "RoutedOptions", "RoutedRouter", "AllRouter"]


class SingleRouter:
    """Every row is scored by the only teacher."""

    route_key = "teacher"

    def __init__(self, teacher: str) -> None:
        self.teacher = teacher

    @staticmethod
    def check(options: Any, config: RunConfig) -> list[str]:
        if len(config.teachers) != 1:
            return [f"router 'single' needs exactly one teacher, got {len(config.teachers)} @ router.name"]
        return []

    @classmethod
    def build(cls, options: NoOptions, context: BuildContext) -> SingleRouter:
        return cls(teacher_key(context.run_config.teachers[0], 0))

    def route(self, row: PromptRow) -> tuple[str, ...]:
        return (self.teacher,)


@attrs.frozen(kw_only=True)
class RoutedOptions:
    route_key: str = "teacher"
    on_unknown_route: Literal["skip", "error"] = "skip"


class RoutedRouter:
    """Routed MOPD: ``row[route_key]`` selects exactly one teacher by its ``route_value``."""

    def __init__(self, routes: dict[str, str], options: RoutedOptions) -> None:
        self.routes = routes  # route value -> teacher name
        self.route_key = options.route_key
        self.on_unknown = options.on_unknown_route

    @staticmethod
    def check(options: RoutedOptions, config: RunConfig) -> list[str]:
        seen: dict[str, int] = {}
        problems = []
        for index, teacher in enumerate(config.teachers):
            value = route_value(teacher, index)
            if value in seen:
                problems.append(
                    f"route value '{value}' is already used by teachers[{seen[value]}]; each teacher "
                    f"needs its own route_value @ teachers[{index}].route_value"
                )
            seen.setdefault(value, index)
        return problems

    @classmethod
    def build(cls, options: RoutedOptions, context: BuildContext) -> RoutedRouter:
        teachers = context.run_config.teachers
        routes = {route_value(t, i): teacher_key(t, i) for i, t in enumerate(teachers)}
        return cls(routes, options)

    def route(self, row: PromptRow) -> tuple[str, ...]:
        value = row.metadata.get(self.route_key)
        if isinstance(value, str) and value in self.routes:
            return (self.routes[value],)
        shown = "<missing>" if value is None else str(value)
        if self.on_unknown == "error":
            raise DistillError(
                f"Dataset line {row.index} has {self.route_key} = {value!r}, which routes to no "
                f"teacher (known: {', '.join(sorted(self.routes))}). Fix the row, add a teacher with "
                f"that route_value, or set router.on_unknown_route = \"skip\"."
            )
        raise SkipRow(f"unknown_route:{shown}")


class AllRouter:
    """Every teacher with a positive blend weight scores every row (zero-weight teachers do not)."""

    route_key = "teacher"

    def __init__(self, teachers: tuple[str, ...]) -> None:
        self.teachers = teachers

    @staticmethod
    def check(options: Any, config: RunConfig) -> list[str]:
        if not any(t.blend_weight > 0 for t in config.teachers):
            return ["router 'all' needs at least one teacher with blend_weight > 0 @ teachers"]
        return []

    @classmethod
    def build(cls, options: NoOptions, context: BuildContext) -> AllRouter:
        teachers = context.run_config.teachers
        return cls(tuple(teacher_key(t, i) for i, t in enumerate(teachers) if t.blend_weight > 0))

    def route(self, row: PromptRow) -> tuple[str, ...]:
        return self.teachers


@hookimpl
def distill_routers() -> list[RouterSpec]:
    return [
        RouterSpec(
            name="single",
            summary="Every row is scored by the one configured teacher.",
            factory=SingleRouter.build,
            check=SingleRouter.check,
        ),
        RouterSpec(
            name="routed",
            summary="Routed MOPD: row[route_key] picks exactly one teacher by its route_value.",
            config_cls=RoutedOptions,
            factory=RoutedRouter.build,
            check=RoutedRouter.check,
        ),
        RouterSpec(
            name="all",
            summary="Every teacher with blend_weight > 0 scores every row (top-K blending).",
            factory=AllRouter.build,
            check=AllRouter.check,
            multi_teacher=True,
        ),
    ]
