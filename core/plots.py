"""``distill-run report``: plots of one or more runs from their ``metrics.jsonl`` and ``summary.json``.

Each plot is a matplotlib :class:`~matplotlib.figure.Figure` built without pyplot (no global
state, no display needed); :func:`figures` returns them by name so tests can read back exactly
what was drawn, and :func:`write_report` saves them with a self-contained ``index.html`` (images
inlined, the summary table). Several runs share every plot, one colour per run. matplotlib is the
optional ``report`` extra, imported only here.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from distill.errors import DistillError
from distill.report import PHASES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Run", "figures", "load_run", "smooth", "write_report"]

PER_STEP = {  # metric -> (title, y label)
    "reverse_kl": ("Reverse KL to the teacher per step", "reverse KL (nats / token)"),
    "loss": ("Training loss per step", "loss (per token)"),
    "grad_norm": ("Gradient norm per step", "gradient L2 norm (before clipping)"),
    "learning_rate": ("Learning rate per step", "learning rate"),
    "tokens_per_s": ("Throughput per step", "completion tokens / s"),
}
SMOOTHED = ("reverse_kl", "loss")  # noisy per step: a smoothed line over the raw points


@attrs.frozen
class Run:
    """One run folder's records: ``metrics`` one dict per step, ``summary`` None until it ends."""

    name: str
    path: Path
    metrics: tuple[dict[str, Any], ...]
    summary: dict[str, Any] | None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a per-step metric, skipping steps where it is missing or null."""
        pairs = [(m["step"], m[key]) for m in self.metrics if m.get(key) is not None]
        return [s for s, _ in pairs], [float(v) for _, v in pairs]

    @property
    def teachers(self) -> list[str]:
        return sorted({key.split("/")[1] for m in self.metrics for key in m
                       if key.startswith("teacher/") and key.endswith("/reverse_kl")})


def load_run(path: str | Path, name: str | None = None) -> Run:
    path = Path(path)
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise DistillError(f"{path} has no metrics.jsonl: give the output_dir of a run (with the jsonl sink).")
    metrics = []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a crash; the run repairs it when it resumes
            continue
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else None
    return Run(name or path.resolve().name, path, tuple(metrics), summary)


def smooth(values: Sequence[float]) -> list[float]:
    """Trailing mean over a window of a 25th of the run (at least 1 step): the trend, same length."""
    window = max(1, len(values) // 25)
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.2), layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _per_step(runs: Sequence[Run], key: str) -> Figure | None:
    if not any(run.series(key)[0] for run in runs):
        return None
    title, ylabel = PER_STEP[key]
    figure, axes = _figure(title, "step", ylabel)
    for i, run in enumerate(runs):
        steps, values = run.series(key)
        if key in SMOOTHED:
            axes.scatter(steps, values, s=6, alpha=0.25, color=_colour(i), linewidths=0)
            values = smooth(values)
        axes.plot(steps, values, color=_colour(i), label=run.name)
    if key == "learning_rate":
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if len(runs) > 1:
        axes.legend()
    return figure


def _per_teacher(runs: Sequence[Run]) -> Figure | None:
    lines = [(run, teacher) for run in runs for teacher in run.teachers]
    if not lines:
        return None
    figure, axes = _figure("Reverse KL per teacher (its rows only)", "step", "reverse KL (nats / token)")
    for i, (run, teacher) in enumerate(lines):
        steps, values = run.series(f"teacher/{teacher}/reverse_kl")
        axes.scatter(steps, values, s=6, alpha=0.25, color=_colour(i), linewidths=0)
        axes.plot(steps, smooth(values), color=_colour(i),
                  label=f"{run.name}: {teacher}" if len(runs) > 1 else teacher)
    axes.legend()
    return figure


def _time_split(runs: Sequence[Run]) -> Figure | None:
    done = [run for run in runs if run.summary]
    if not done:
        return None
    figure, axes = _figure("Where the wall time went", "run", "wall time (s)")
    names = [run.name for run in done]
    bottom = [0.0] * len(done)
    split = {phase.replace("_", " "): [run.summary["time_s"].get(phase, 0.0) for run in done] for phase in PHASES}
    # model loading, data, start-up: the wall time no phase counted
    split["other (start-up, loading)"] = [max(0.0, run.summary["wall_time_s"] - sum(run.summary["time_s"].values()))
                                          for run in done]
    for i, (label, seconds) in enumerate(split.items()):
        axes.bar(names, seconds, bottom=bottom, color=_colour(i), label=label, width=0.5)
        bottom = [b + s for b, s in zip(bottom, seconds, strict=True)]
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def _percent(value: float | None) -> float:
    return math.nan if value is None else 100 * value


def _accuracy(runs: Sequence[Run]) -> Figure | None:
    """Held-out exact match before and after training: per route when there are routes."""
    done = [run for run in runs if run.summary and run.summary.get("student_accuracy_after") is not None]
    if not done:
        return None
    routes = sorted({route for run in done for route in run.summary.get("per_route", {})})
    groups = routes or ["all rows"]
    figure, axes = _figure("Held-out exact match before and after training", "route" if routes else "",
                           "exact match (%)")
    bars = [(run, when) for run in done for when in ("before", "after")]
    width = 0.8 / len(bars)
    for j, (run, when) in enumerate(bars):
        if routes:
            values = [_percent(run.summary["per_route"].get(r, {}).get(f"accuracy_{when}")) for r in routes]
        else:
            values = [_percent(run.summary[f"student_accuracy_{when}"])]
        xs = [g + (j - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        container = axes.bar(xs, values, width=width, color=_colour(done.index(run)),
                             alpha=0.45 if when == "before" else 1.0,
                             label=f"{run.name} {when}" if len(done) > 1 else when)
        # inside the bar, clear of the teacher's line at the top
        axes.bar_label(container, fmt="%.1f", fontsize=8, label_type="center",
                       color="black" if when == "before" else "white")
    teacher = {run.summary.get("teacher_accuracy") for run in done}
    if not routes and len(teacher) == 1 and None not in teacher:
        value = _percent(teacher.pop())
        axes.axhline(value, color="grey", linestyle="--", label=f"teacher ({value:.1f}%)")
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylim(0, 105)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def _eval_history(runs: Sequence[Run]) -> Figure | None:
    done = [run for run in runs if run.summary and run.summary.get("eval_history")]
    if not done:
        return None
    figure, axes = _figure("Held-out exact match during training", "step", "exact match (%)")
    for i, run in enumerate(done):
        history = [entry for entry in run.summary["eval_history"] if entry.get("accuracy") is not None]
        axes.plot([e["step"] for e in history], [_percent(e["accuracy"]) for e in history], marker="o",
                  color=_colour(i), label=run.name)
    axes.set_ylim(0, 105)
    if len(done) > 1:
        axes.legend()
    return figure


PLOTS: dict[str, Callable[[Sequence[Run]], Figure | None]] = {
    "reverse_kl": lambda runs: _per_step(runs, "reverse_kl"),
    "loss": lambda runs: _per_step(runs, "loss"),
    "teacher_reverse_kl": _per_teacher,
    "grad_norm": lambda runs: _per_step(runs, "grad_norm"),
    "learning_rate": lambda runs: _per_step(runs, "learning_rate"),
    "tokens_per_s": lambda runs: _per_step(runs, "tokens_per_s"),
    "time_split": _time_split,
    "accuracy": _accuracy,
    "eval_history": _eval_history,
}
"""Every plot, in the order of the report; a plot with nothing to draw (no summary yet) is left out."""


def figures(runs: Sequence[Run]) -> dict[str, Figure]:
    if importlib.util.find_spec("matplotlib") is None:
        raise DistillError("distill-run report needs matplotlib: pip install 'distill[report]'")
    return {name: figure for name, plot in PLOTS.items() if (figure := plot(runs)) is not None}


SUMMARY_ROWS = {  # summary key -> (label, format)
    "steps": ("steps", "{:d}"),
    "tokens": ("completion tokens", "{:,d}"),
    "wall_time_s": ("wall time (s)", "{:.1f}"),
    "loss": ("loss", "{}"),
    "teacher_accuracy": ("teacher exact match", "{:.1%}"),
    "student_accuracy_before": ("student exact match before", "{:.1%}"),
    "student_accuracy_after": ("student exact match after", "{:.1%}"),
    "reverse_kl_before": ("reverse KL before (nats / token)", "{:.3f}"),
    "reverse_kl_after": ("reverse KL after (nats / token)", "{:.3f}"),
}


def _summary_table(runs: Sequence[Run]) -> str:
    def cell(run: Run, key: str, form: str) -> str:
        value = (run.summary or {}).get(key)
        return "–" if value is None else html.escape(form.format(value))

    head = "".join(f"<th>{html.escape(run.name)}</th>" for run in runs)
    rows = "".join(f"<tr><th>{html.escape(label)}</th>{''.join(f'<td>{cell(run, key, form)}</td>' for run in runs)}</tr>"
                   for key, (label, form) in SUMMARY_ROWS.items())
    return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html(runs: Sequence[Run], images: dict[str, Path], image_format: str) -> str:
    mime = {"png": "image/png", "svg": "image/svg+xml"}[image_format]
    title = "distill report: " + ", ".join(run.name for run in runs)
    pending = [run.name for run in runs if run.summary is None]
    note = (f"<p>No summary.json yet (running or stopped): {html.escape(', '.join(pending))}; "
            f"only the per-step plots include it.</p>" if pending else "")
    pictures = "".join(
        f'<figure><img alt="{html.escape(name.replace("_", " "))}" '
        f'src="data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"></figure>'
        for name, path in images.items())
    style = ("body{font-family:sans-serif;margin:2em;max-width:64em}table{border-collapse:collapse}"
             "th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}thead th{text-align:center}"
             "figure{margin:1.5em 0}img{max-width:100%}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{note}"
            f"<h2>Summary</h2>{_summary_table(runs)}<h2>Plots</h2>{pictures}</body></html>\n")


def _names(paths: Sequence[Path]) -> list[str]:
    """Folder names, or the last two parts of the paths where two runs share a folder name."""
    names = [path.resolve().name for path in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def write_report(run_dirs: Sequence[str | Path], *, out: str | Path | None = None, image_format: str = "png") -> Path:
    """Plot the runs into ``out`` (default ``report/`` in the first run folder); return ``index.html``."""
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(path, name) for path, name in zip(paths, _names(paths), strict=True)]
    drawn = figures(runs)
    out = Path(out) if out else paths[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, figure in drawn.items():
        images[name] = out / f"{name}.{image_format}"
        figure.savefig(images[name], dpi=110)
    index = out / "index.html"
    index.write_text(_html(runs, images, image_format), encoding="utf-8")
    return index
