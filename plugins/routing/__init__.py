"""Built-in plugin ``routing``: which teacher scores which row.

``single`` sends every row to the one configured teacher.
"""

from __future__ import annotations

from distill import BuildContext, NoOptions, PromptRow, RouterSpec, hookimpl
from distill.config import teacher_key
from distill.errors import ConfigError

__all__ = ["SingleRouter"]


class SingleRouter:
    """Every row is scored by the only teacher."""

    def __init__(self, teacher: str) -> None:
        self.teacher = teacher

    @classmethod
    def build(cls, options: NoOptions, context: BuildContext) -> SingleRouter:
        teachers = context.run_config.teachers
        if len(teachers) != 1:
            raise ConfigError(
                [f"router 'single' needs exactly one teacher, got {len(teachers)} @ router.name"]
            )
        return cls(teacher_key(teachers[0], 0))

    def route(self, row: PromptRow) -> tuple[str, ...]:
        return (self.teacher,)


@hookimpl
def distill_routers() -> list[RouterSpec]:
    return [
        RouterSpec(
            name="single",
            summary="Every row is scored by the one configured teacher.",
            factory=SingleRouter.build,
        )
    ]
