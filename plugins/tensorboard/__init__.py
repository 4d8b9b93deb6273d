"""Built-in plugin ``tensorboard``: every step's metrics as TensorBoard scalars, held-out results,
and the run config as text, in one event directory per run (``pip install 'distill[tensorboard]'``).

Tags: ``train/<metric>``, per-teacher metrics keep their own group (``teacher/<name>/<metric>``),
``eval/accuracy`` and ``eval/reverse_kl`` (per route: ``eval/<route>/…``), ``config``. A resumed
run appends to the same directory and writes no tag at a step the files already hold: the steps it
redoes after a resume are bit-identical, and TensorBoard would otherwise draw them twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from distill import BuildContext, MetricSink, MetricSinkSpec, display_config, hookimpl
from distill.plugins._extras import missing_extra

__all__ = ["TensorBoardOptions", "TensorBoardSink"]


@attrs.frozen(kw_only=True)
class TensorBoardOptions:
    log_dir: str | None = None


def _written_steps(log_dir: Path) -> dict[str, int]:
    """The last step of each tag in the event files already in ``log_dir`` (a record cut short by a
    crash ends its file's reading, so that step is written again)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    last: dict[str, int] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                last[value.tag] = max(event.step, last.get(value.tag, event.step))
    return last


class TensorBoardSink(MetricSink):
    def __init__(self, log_dir: Path, config: Mapping[str, Any]) -> None:
        self.log_dir = log_dir
        self.config = config
        self._writer: Any = None
        self._written: dict[str, int] = {}

    @classmethod
    def build(cls, options: TensorBoardOptions, context: BuildContext) -> TensorBoardSink:
        log_dir = Path(options.log_dir) if options.log_dir else context.output_dir / "tensorboard"
        return cls(log_dir, display_config(context.run_config))

    def resume_at(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._written = _written_steps(self.log_dir)
        self._writer = SummaryWriter(str(self.log_dir))
        if "config/text_summary" not in self._written:  # TensorBoard's name for the text tag "config"
            self._writer.add_text("config", f"```\n{json.dumps(self.config, indent=1)}\n```", 0)
            self._writer.flush()

    def _scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for tag, value in scalars.items():
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if is_number and math.isfinite(value) and self._written.get(tag, -1) < step:
                self._writer.add_scalar(tag, value, step)
        self._writer.flush()  # a killed run keeps every step it wrote

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._scalars(step, {key if "/" in key else f"train/{key}": value for key, value in metrics.items()})

    def write_eval(self, step: int, result: Mapping[str, Any]) -> None:
        scalars = {"eval/accuracy": result.get("accuracy"), "eval/reverse_kl": result.get("reverse_kl")}
        for route, numbers in result.get("per_route", {}).items():
            scalars |= {f"eval/{route}/accuracy": numbers["accuracy"], f"eval/{route}/reverse_kl": numbers["reverse_kl"]}
        self._scalars(step, scalars)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@hookimpl
def distill_metric_sinks() -> list[MetricSinkSpec]:
    return [
        MetricSinkSpec(
            name="tensorboard",
            summary="TensorBoard scalars per step, held-out results and the config in <output_dir>/tensorboard.",
            config_cls=TensorBoardOptions,
            factory=TensorBoardSink.build,
            check=lambda options, context: missing_extra("tensorboard", "tensorboard", context.path),
        )
    ]
