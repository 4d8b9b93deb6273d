"""``status.json``: where a run stands, for orchestrators that poll a folder instead of reading logs.

The file is replaced atomically (written beside, then renamed), so a reader never sees half of it.
It is written when the run holds its output folder (``pending``), when training starts
(``running``), after steps (at most once a second), and when the run ends: ``completed``,
``failed`` (with the error) or ``stopped`` (with the signal). A run killed outright (SIGKILL, the
OOM killer) cannot write its end: its file stays ``running`` and stops changing; ``pid``, ``host``
and ``updated_at`` tell an orchestrator whose process to look for.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

__all__ = ["RunStatus", "State", "read_status"]

State = Literal["pending", "running", "completed", "failed", "stopped"]

FILENAME = "status.json"
EVERY_S = 1.0  # throttle of the per-step writes: cheap for fast steps, fresh for slow ones


class RunStatus:
    """Writes ``<output_dir>/status.json``; every write carries the whole state."""

    def __init__(self, output_dir: Path, total_steps: int) -> None:
        self.path = Path(output_dir) / FILENAME
        self.total_steps = total_steps
        self.state: State = "pending"
        self.step = 0
        self.tokens = 0
        self._written_at = float("-inf")

    def write(self, state: State, *, step: int | None = None, tokens: int | None = None,
              error: str | None = None, signal: str | None = None) -> None:
        self.state = state
        self.step = self.step if step is None else step
        self.tokens = self.tokens if tokens is None else tokens
        status = {
            "state": state,
            "step": self.step,
            "total_steps": self.total_steps,
            "percent": round(100 * self.step / self.total_steps, 1),
            "tokens": self.tokens,
            "error": error,
            "signal": signal,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        tmp = self.path.with_name(f".{FILENAME}.tmp")
        tmp.write_text(json.dumps(status, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
        self._written_at = time.monotonic()

    def advance(self, step: int, tokens: int) -> None:
        """After a step: written when the last write is a second old, else only remembered."""
        self.step, self.tokens = step, tokens
        if time.monotonic() - self._written_at >= EVERY_S:
            self.write("running")


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``status.json`` as written, or None when it has none (not a run folder, or a run
    that has not taken its folder yet)."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
