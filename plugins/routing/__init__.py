"""Built-in plugin ``routing``: which teacher scores which row.

``single`` sends every row to the one configured teacher.
"""

from __future__ import annotations

from typing import Any

from distill import BuildContext, NoOptions, PromptRow, RouterSpec, hookimpl
from distill.config import RunConfig, teacher_key

__all__ = ["SingleRouter"]


class SingleRouter:
    """Every row is scored by the only teacher."""

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


@hookimpl
def distill_routers() -> list[RouterSpec]:
    return [
        RouterSpec(
            name="single",
            summary="Every row is scored by the one configured teacher.",
            factory=SingleRouter.build,
            check=SingleRouter.check,
        )
    ]
