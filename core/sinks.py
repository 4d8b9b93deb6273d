"""The run's metric sinks behind one guard: a sink whose backend fails never stops training.

Metrics are a report, not the result: a tracking server that goes down, a full disk under an event
file or a bug in a third-party sink should cost its curves, not the run. Each failed call is
counted per sink (``summary.json`` ``metric_sinks``) and the first one is logged with its error;
later calls still go through, so a backend that recovers keeps recording.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog

from distill.protocols import MetricSink

__all__ = ["MetricSinks"]

log = structlog.get_logger("distill")


class MetricSinks:
    """The sinks a run writes to, by name, each call guarded."""

    def __init__(self, sinks: Mapping[str, MetricSink]) -> None:
        self.sinks = dict(sinks)
        self.failures: dict[str, int] = dict.fromkeys(self.sinks, 0)
        self.errors: dict[str, str] = {}

    def _each(self, call: Callable[[MetricSink], None], what: str) -> None:
        for name, sink in self.sinks.items():
            try:
                call(sink)
            except Exception as exc:  # any failure of a sink is its own, never the run's
                self.failures[name] += 1
                if name not in self.errors:
                    self.errors[name] = f"{type(exc).__name__}: {exc}"
                    log.warning("metric sink failed; training goes on without what it missed (counted in "
                                "the summary, logged once)", sink=name, call=what, error=self.errors[name])

    def resume_at(self, step: int) -> None:
        self._each(lambda sink: sink.resume_at(step), "resume_at")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._each(lambda sink: sink.write(step, metrics), "write")

    def write_eval(self, step: int, result: Mapping[str, Any]) -> None:
        self._each(lambda sink: sink.write_eval(step, result), "write_eval")

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self._each(lambda sink: sink.write_summary(summary), "write_summary")

    def close(self) -> None:
        """Close every sink once; later calls do nothing."""
        self._each(lambda sink: sink.close(), "close")
        self.sinks = {}

    def report(self) -> dict[str, dict[str, Any]]:
        """Per sink: failed calls over the whole run and the first error, for ``summary.json``."""
        return {name: {"failures": n, "error": self.errors.get(name)} for name, n in self.failures.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"failures": self.failures, "errors": self.errors}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Counts of an earlier attempt, for the sinks this run still has."""
        for name, n in state.get("failures", {}).items():
            if name in self.failures:
                self.failures[name] += n
        for name, error in state.get("errors", {}).items():
            if name in self.failures:
                self.errors.setdefault(name, error)
