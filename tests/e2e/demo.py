"""The arithmetic demo, cut to a few steps, run by ``distill-run`` in a subprocess (so it can be
stopped by a signal like a real run): shared by the status and metric-sink tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "arithmetic"
STEPS = 6
SHORT = ("train.steps=6", "train.threads=1", "eval.limit=16", "eval.every_steps=3", "checkpoint.every_steps=2")


def start(out: Path, *sets: str, config: str = "opd.toml", env: dict[str, str] | None = None) -> subprocess.Popen:
    """``distill-run run`` of the demo into ``out`` with the short settings and ``sets``."""
    overrides = [arg for value in (*SHORT, f"output_dir='{out}'", *sets) for arg in ("--set", value)]
    return subprocess.Popen([sys.executable, "-m", "distill.cli", "run", str(DEMO / config), "--no-progress",
                             *overrides], env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for the run; (exit code, stderr)."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def stop_after(proc: subprocess.Popen, metrics: Path, steps: int, timeout: float = 180) -> tuple[int, str]:
    """SIGTERM once ``metrics`` has ``steps`` lines; (exit code, stderr) of the stopped run."""
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "run made no progress"
        time.sleep(0.01)
    proc.terminate()
    return finish(proc)
