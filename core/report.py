"""What a run reports: the progress line per step and ``summary.json`` at the end.

Kept apart from the recipe so the loop reads as the algorithm; everything here only reads a
:class:`distill.loop.Recipe`'s state.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import structlog

from distill.scoring import TeacherBook

if TYPE_CHECKING:
    from distill.loop import Recipe

__all__ = ["Progress", "summary", "per_route"]

log = structlog.get_logger("distill")

PHASES = ("sampling", "teacher_scoring", "training", "weight_sync", "eval", "checkpoint")


def _per_teacher_kl(metrics: dict[str, Any]) -> dict[str, str]:
    return {
        f"rkl[{key.split('/')[1]}]": f"{value:.3f}"
        for key, value in metrics.items()
        if key.startswith("teacher/") and key.endswith("/reverse_kl") and value is not None
    }


class Progress:
    """A progress bar on a terminal; one log line per step otherwise (the bar is disabled there)."""

    def __init__(self, total: int, initial: int, *, enabled: bool | None) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        disable=True if enabled is False else None)

    def __enter__(self) -> Progress:
        return self

    def advance(self, step: int, metrics: dict[str, Any] | None) -> None:
        if metrics is not None and self.bar.disable:
            log.info("step", step=step, loss=metrics["loss"], reverse_kl=metrics["reverse_kl"],
                     grad_norm=metrics["grad_norm"], tokens_per_s=metrics["tokens_per_s"])
        elif metrics is not None:
            several = sum(k.endswith("/reverse_kl") for k in metrics) > 1
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", rkl=f"{metrics['reverse_kl']:.4f}",
                                 **(_per_teacher_kl(metrics) if several else {}),
                                 tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
        self.bar.update(1)

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def per_route(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """Held-out results per route value; with one teacher per route, that teacher's numbers too."""
    evaluation = recipe.evaluation
    before = evaluation.get("before", {}).get("per_route", {})
    after = evaluation.get("after", {}).get("per_route", {})
    one_per_route = not recipe.manager.get("router", recipe.config.router.name).multi_teacher
    teacher_of = {ref.route_value: ref.name for ref in recipe.context.teachers}
    report = {}
    for route in sorted(set(before) | set(after)):
        entry = {
            "eval_rows": (after.get(route) or before.get(route))["rows"],
            "accuracy_before": before.get(route, {}).get("accuracy"),
            "accuracy_after": after.get(route, {}).get("accuracy"),
            "reverse_kl_before": before.get(route, {}).get("reverse_kl"),
            "reverse_kl_after": after.get(route, {}).get("reverse_kl"),
        }
        teacher = teacher_of.get(route)
        if one_per_route and teacher is not None:
            book = recipe.pool.totals.get(teacher, TeacherBook())
            entry.update(
                teacher=teacher,
                teacher_accuracy=evaluation.get("teacher_accuracy_by_teacher", {}).get(teacher),
                rows_scored=book.rows,
                tokens_scored=book.tokens,
            )
        report[route] = entry
    return report


def summary(recipe: Recipe, final_uri: str, counters: dict[str, Any]) -> dict[str, Any]:
    """The run at a glance, as written to ``summary.json``; ``counters``: the components' own,
    summed over processes."""
    config, evaluation = recipe.config, recipe.evaluation
    before, after = evaluation.get("before", {}), evaluation.get("after", {})
    return {
        "steps": config.train.steps,
        "resumed_from_step": recipe.started_from or None,
        "tokens": recipe.tokens,
        "wall_time_s": recipe.wall_time(),
        "time_s": {phase: recipe.clock.totals.get(phase, 0.0) for phase in PHASES},
        "rows_train": len(recipe.train_data.rows),
        "rows_skipped": dict(Counter(recipe.train_data.skipped) + recipe.skipped),
        "eval_rows": len(recipe.eval_rows),
        "eval_rows_skipped": dict(recipe.eval_data.skipped) if recipe.eval_data else {},
        "eval_dropped": dict(recipe.eval_dropped),
        "teacher_accuracy": evaluation.get("teacher_accuracy"),
        "student_accuracy_before": before.get("accuracy"),
        "student_accuracy_after": after.get("accuracy"),
        "reverse_kl_before": before.get("reverse_kl"),
        "reverse_kl_after": after.get("reverse_kl"),
        "teachers": {
            name: {**book.as_dict(), **counters["teachers"][name]}
            for name, book in sorted(recipe.pool.totals.items())
        },
        "sampler": counters["sampler"],
        "metric_sinks": recipe.sinks.report(),
        "per_route": per_route(recipe),
        "eval_history": evaluation.get("history", []),
        "loss": config.loss.name,
        "loss_kernel": recipe.loss_kernel,
        "final_model": final_uri,
    }
