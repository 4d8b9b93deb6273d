"""Built-in plugin ``routing``: which teacher scores which row.

* ``single``: every row goes to the one configured teacher.
* ``routed`` (routed MOPD): each row goes to exactly the teacher whose ``route_value`` equals
  ``row[route_key]``; rows with a missing, non-string or unknown value are skipped and counted as
  ``unknown_route:<value>``, or stop the run with ``on_unknown_route = "error"``.
* ``all``: every teacher with a positive ``blend_weight`` scores every row, for top-K blending.
* ``auto`` (the default): ``single`` with one teacher; with several, ``all`` for a top-K loss
  (blending) and ``routed`` otherwise. Chosen at config time; the config records the choice.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from distill import BuildContext, DistillError, NoOptions, PromptRow, Router, RouterSpec, SkipRow, hookimpl

__all__ = ["SingleRouter", "RoutedOptions", "RoutedRouter", "AllRouter", "choose_router"]


class SingleRouter(Router):
    """Every row is scored by the only teacher."""

    def __init__(self, teacher: str) -> None:
        self.teacher = teacher

    @staticmethod
    def check(options: Any, context: BuildContext) -> list[str]:
        if len(context.teachers) != 1:
            return [f"router 'single' needs exactly one teacher, got {len(context.teachers)} @ router.name"]
        return []

    @classmethod
    def build(cls, options: NoOptions, context: BuildContext) -> SingleRouter:
        return cls(context.teachers[0].name)

    def route(self, row: PromptRow) -> tuple[str, ...]:
        return (self.teacher,)


@attrs.frozen(kw_only=True)
class RoutedOptions:
    route_key: str = "teacher"
    on_unknown_route: Literal["skip", "error"] = "skip"


class RoutedRouter(Router):
    """Routed MOPD: ``row[route_key]`` selects exactly one teacher by its ``route_value``."""

    def __init__(self, routes: dict[str, str], options: RoutedOptions) -> None:
        self.routes = routes  # route value -> teacher name
        self.route_key = options.route_key
        self.on_unknown = options.on_unknown_route

    @staticmethod
    def check(options: RoutedOptions, context: BuildContext) -> list[str]:
        seen: dict[str, str] = {}
        problems = []
        for teacher in context.teachers:
            if teacher.route_value in seen:
                problems.append(
                    f"route value '{teacher.route_value}' is already used by {seen[teacher.route_value]}; "
                    f"each teacher needs its own route_value @ {teacher.path}.route_value"
                )
            seen.setdefault(teacher.route_value, teacher.path)
        return problems

    @classmethod
    def build(cls, options: RoutedOptions, context: BuildContext) -> RoutedRouter:
        return cls({t.route_value: t.name for t in context.teachers}, options)

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


class AllRouter(Router):
    """Every teacher with a positive blend weight scores every row (zero-weight teachers do not)."""

    def __init__(self, teachers: tuple[str, ...]) -> None:
        self.teachers = teachers

    @staticmethod
    def check(options: Any, context: BuildContext) -> list[str]:
        if not any(t.blend_weight > 0 for t in context.teachers):
            return ["router 'all' needs at least one teacher with blend_weight > 0 @ teachers"]
        return []

    @classmethod
    def build(cls, options: NoOptions, context: BuildContext) -> AllRouter:
        return cls(tuple(t.name for t in context.teachers if t.blend_weight > 0))

    def route(self, row: PromptRow) -> tuple[str, ...]:
        return self.teachers


def choose_router(context: BuildContext) -> str:
    """``auto``: one teacher -> single; several -> all (blend) for a top-K loss, else routed."""
    if len(context.teachers) <= 1:
        return "single"
    return "all" if context.teacher_signal == "topk" else "routed"


@hookimpl
def distill_routers() -> list[RouterSpec]:
    return [
        RouterSpec(
            name="auto",
            summary="single with one teacher; with several, all for a top-K loss, else routed.",
            factory=lambda options, context: None,  # never built: it names another router
            delegate=choose_router,
        ),
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
