"""Built-in plugin ``metrics``: a JSONL sink, one object per step at ``<output_dir>/metrics.jsonl``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog

from distill import BuildContext, MetricSink, MetricSinkSpec, folder_problems, hookimpl

__all__ = ["JsonlOptions", "JsonlSink"]

log = structlog.get_logger("distill")


@attrs.frozen(kw_only=True)
class JsonlOptions:
    path: str | None = None


def _plain(value: Any) -> Any:
    """Strict JSON: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class JsonlSink(MetricSink):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    @classmethod
    def build(cls, options: JsonlOptions, context: BuildContext) -> JsonlSink:
        return cls(Path(options.path) if options.path else context.output_dir / "metrics.jsonl")

    def resume_at(self, step: int) -> None:
        """Drop lines of steps after ``step``: they are about to be redone. Lines cut short (a
        write interrupted by a crash or power loss) are dropped too, with a warning."""
        if self.path.exists():
            kept, torn = [], []
            text = self.path.read_text(encoding="utf-8", errors="replace")  # a torn line may be any bytes
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    torn.append(number)
                    continue
                if record.get("step", 0) <= step:
                    kept.append(line)
            if torn:
                log.warning("dropped incomplete lines from the metrics file, keeping the complete ones",
                            path=str(self.path), lines=torn)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(_plain({"step": step, **metrics})) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _check(options: JsonlOptions, context: BuildContext) -> list[str]:
    """A path that cannot be a writable file would fail at the first step."""
    if not options.path:
        return []
    path, where = Path(options.path), f"{context.path}.path"
    if path.is_dir():
        return [f"{options.path!r} is a folder; give the path of a file @ {where}"]
    return folder_problems(str(path.parent), where)


@hookimpl
def distill_metric_sinks() -> list[MetricSinkSpec]:
    return [
        MetricSinkSpec(
            name="jsonl",
            summary="One JSON object per step in <output_dir>/metrics.jsonl.",
            config_cls=JsonlOptions,
            factory=JsonlSink.build,
            check=_check,
        )
    ]
