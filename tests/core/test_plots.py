"""``distill-run report``: every plot holds exactly the data it was drawn from (read back from
matplotlib's artists, not pixels), is titled with labelled axes and no overlapping text; two runs
share one report; the HTML is self-contained."""

import base64
import json
import re
import shutil

import pytest

from distill.cli import main
from distill.config import load_config
from distill.loop import run
from distill.manager import PluginManager

from ..e2e import demo

pytestmark = pytest.mark.observability
pytest.importorskip("matplotlib", reason="matplotlib is an optional extra: pip install -e '.[report]'")

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from distill.plots import figures, load_run, smooth

ALL = ["reverse_kl", "loss", "teacher_reverse_kl", "grad_norm", "learning_rate", "tokens_per_s", "time_split",
       "accuracy", "eval_history"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short demo runs, on-policy reverse KL and top-K forward KL (the tests using them are slow)."""
    root = tmp_path_factory.mktemp("runs")
    manager = PluginManager()
    for name, config in (("arithmetic-opd", "opd.toml"), ("arithmetic-topk", "topk.toml")):
        overrides = [*demo.SHORT, f"output_dir='{root / name}'"]
        run(load_config(demo.DEMO / config, manager, overrides), manager, progress=False)
    return root / "arithmetic-opd", root / "arithmetic-topk"


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _series(path, key):
    lines = [m for m in _metrics(path) if m.get(key) is not None]
    return [m["step"] for m in lines], [m[key] for m in lines]


def _bars(axes):
    return [patch for patch in axes.patches if isinstance(patch, Rectangle)]


def _readable(figure):
    """Titled, both axes labelled, every text inside the figure and no two texts overlapping."""
    (axes,) = figure.axes
    assert axes.get_title() and axes.get_ylabel()
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    labels, drawn = set(), []  # tick labels are drawn only for ticks inside the view limits
    for axis in (axes.xaxis, axes.yaxis):
        low, high = sorted(axis.get_view_interval())
        for tick in axis.get_major_ticks():
            labels.add(tick.label1)
            if low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                drawn.append(tick.label1)
    texts = [t for t in figure.findobj(Text) if t not in labels] + drawn
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]
    inside = figure.bbox
    for text, box in boxes:
        assert inside.x0 - 1 <= box.x0 and box.x1 <= inside.x1 + 1 and inside.y0 - 1 <= box.y0 and box.y1 <= inside.y1 + 1, text
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"


def test_smooth_is_a_trailing_mean_over_a_25th_of_the_run():
    values = [float(v % 7) for v in range(100)]
    assert smooth(values) == pytest.approx([sum(values[max(0, i - 3):i + 1]) / min(i + 1, 4) for i in range(100)])


@pytest.mark.slow
def test_each_plot_draws_exactly_the_runs_metrics(runs):
    opd, _ = runs
    summary = json.loads((opd / "summary.json").read_text())
    drawn = figures([load_run(opd)])
    assert list(drawn) == ALL
    for figure in drawn.values():
        _readable(figure)

    for key in ("reverse_kl", "loss"):  # a smoothed line over the raw points
        (axes,) = drawn[key].axes
        steps, values = _series(opd, key)
        [points] = [c for c in axes.collections if isinstance(c, PathCollection)]
        assert points.get_offsets()[:, 0].tolist() == steps
        assert points.get_offsets()[:, 1].tolist() == pytest.approx(values)
        [line] = axes.lines
        assert list(line.get_xdata()) == steps and list(line.get_ydata()) == pytest.approx(smooth(values))
    for key in ("grad_norm", "learning_rate", "tokens_per_s", "teacher/teacher/reverse_kl"):
        name = "teacher_reverse_kl" if key.startswith("teacher/") else key
        [line] = drawn[name].axes[0].lines
        steps, values = _series(opd, key)
        assert list(line.get_xdata()) == steps
        assert list(line.get_ydata()) == pytest.approx(values if name == key else smooth(values))

    split = _bars(drawn["time_split"].axes[0])
    phases = summary["time_s"]
    assert [bar.get_height() for bar in split] == pytest.approx(
        [*phases.values(), summary["wall_time_s"] - sum(phases.values())])
    before, after = _bars(drawn["accuracy"].axes[0])
    assert (before.get_height(), after.get_height()) == pytest.approx(
        (100 * summary["student_accuracy_before"], 100 * summary["student_accuracy_after"]))
    [history] = drawn["eval_history"].axes[0].lines
    [teacher] = drawn["accuracy"].axes[0].lines
    assert list(history.get_xdata()) == [entry["step"] for entry in summary["eval_history"]] == [0, 3, 6]
    assert list(history.get_ydata()) == pytest.approx([100 * e["accuracy"] for e in summary["eval_history"]])
    assert list(teacher.get_ydata()) == pytest.approx([100 * summary["teacher_accuracy"]] * 2)


@pytest.mark.slow
def test_two_runs_overlay_with_a_legend_of_their_names(runs, tmp_path):
    drawn = figures([load_run(path) for path in runs])
    for name, figure in drawn.items():
        _readable(figure)
        (axes,) = figure.axes
        legend = [text.get_text() for text in axes.get_legend().get_texts()]
        if name == "accuracy":
            assert legend == ["teacher (100.0%)", "arithmetic-opd before", "arithmetic-opd after",
                              "arithmetic-topk before", "arithmetic-topk after"]
        elif name == "teacher_reverse_kl":
            assert legend == ["arithmetic-opd: teacher", "arithmetic-topk: teacher"]
        elif name != "time_split":
            assert legend == ["arithmetic-opd", "arithmetic-topk"], name
    for path, line in zip(runs, drawn["grad_norm"].axes[0].lines):
        assert list(line.get_ydata()) == pytest.approx(_series(path, "grad_norm")[1])
    assert [t.get_text() for t in drawn["time_split"].axes[0].get_xticklabels()] == ["arithmetic-opd", "arithmetic-topk"]


@pytest.mark.slow
def test_per_route_accuracy_has_a_group_per_route(runs, tmp_path):
    routed = tmp_path / "routed"
    shutil.copytree(runs[0], routed)
    summary = json.loads((routed / "summary.json").read_text())
    summary["per_route"] = {"add": {"accuracy_before": 0.25, "accuracy_after": 0.75},
                            "sub": {"accuracy_before": 0.5, "accuracy_after": 1.0}}
    (routed / "summary.json").write_text(json.dumps(summary))
    (axes,) = figures([load_run(routed)])["accuracy"].axes
    assert [t.get_text() for t in axes.get_xticklabels()] == ["add", "sub"]
    assert [bar.get_height() for bar in _bars(axes)] == pytest.approx([25, 50, 75, 100])  # before ×2, after ×2


@pytest.mark.slow
def test_distill_run_report_writes_the_images_and_a_self_contained_html(runs, tmp_path, capsys):
    opd, topk = runs
    assert main(["report", str(opd)]) == 0
    index = opd / "report" / "index.html"
    assert capsys.readouterr().out.strip() == str(index)
    assert sorted(p.name for p in index.parent.iterdir()) == sorted([f"{name}.png" for name in ALL] + ["index.html"])
    page = index.read_text()
    inlined = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(image) for image in inlined] == [
        (index.parent / f"{name}.png").read_bytes() for name in ALL]
    assert "<th>student exact match after</th>" in page and "src=\"http" not in page

    assert main(["report", str(opd), str(topk), "--out", str(tmp_path / "both"), "--format", "svg"]) == 0
    both = (tmp_path / "both" / "index.html").read_text()
    assert both.count("data:image/svg+xml;base64,") == len(ALL)
    assert "<th>arithmetic-opd</th><th>arithmetic-topk</th>" in both


def test_a_folder_without_metrics_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "has no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_the_report_opens_in_a_headless_browser_without_console_errors(runs, tmp_path):
    from .cdp import Browser, find_browser

    binary = find_browser()
    if binary is None:
        pytest.skip("no headless Chromium: apt-get install chromium-headless-shell")
    index = tmp_path / "report" / "index.html"
    assert main(["report", *map(str, runs), "--out", str(index.parent)]) == 0
    broken = tmp_path / "broken.html"  # the check itself: a page with a missing image is caught
    broken.write_text('<!DOCTYPE html><html lang="en"><title>x</title><img alt="x" src="missing.png"></html>')
    browser = Browser(binary, tmp_path / "profile")
    try:
        caught = browser.open(broken.as_uri(), tmp_path / "broken.png")
        problems = browser.open(index.as_uri(), tmp_path / "screenshot.png")
        images = browser.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
    finally:
        browser.close()
    assert [event["params"]["entry"]["text"] for event in caught] == ["Failed to load resource: net::ERR_FILE_NOT_FOUND"]
    assert problems == []
    assert len(images) == len(ALL) and all(width > 0 for width in images)  # every inlined image decoded
    assert (tmp_path / "screenshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
