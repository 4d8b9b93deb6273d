"""What a run tells the outside while and after it runs: status.json through a stop and a resume,
and a metric sink whose backend fails mid-run, which costs its curves but not the run."""

import json
import signal

import pytest

from distill import MetricSink, MetricSinkSpec, TeacherScorer, TeacherSpec, hookimpl
from distill.config import load_config
from distill.loop import run
from distill.status import read_status

from . import demo


@pytest.mark.slow
def test_status_through_a_sigterm_and_a_resume(tmp_path):
    out = tmp_path / "run"
    code, err = demo.stop_after(demo.start(out), out / "metrics.jsonl", 2)
    assert code == 128 + signal.SIGTERM, err
    done = len((out / "metrics.jsonl").read_text().splitlines())
    stopped = read_status(out)
    assert {k: stopped[k] for k in ("state", "step", "total_steps", "signal", "error")} == {
        "state": "stopped", "step": done, "total_steps": demo.STEPS, "signal": "SIGTERM", "error": None}
    assert stopped["percent"] == round(100 * done / demo.STEPS, 1) and stopped["tokens"] > 0

    code, err = demo.finish(demo.start(out))
    assert code == 0, err
    completed = read_status(out)
    summary = json.loads((out / "summary.json").read_text())
    assert (completed["state"], completed["step"], completed["percent"]) == ("completed", demo.STEPS, 100.0)
    assert completed["tokens"] == summary["tokens"]


class _DownTeacher(TeacherScorer):
    async def score(self, requests, *, top_k):
        raise RuntimeError("teacher down")


class _FlakySink(MetricSink):
    """A sink whose backend goes down after two steps and stays down."""

    def __init__(self):
        self.written = []

    def write(self, step, metrics):
        if step > 2:
            raise ConnectionError("tracking server unreachable")
        self.written.append(step)

    def resume_at(self, step):
        pass

    def close(self):
        pass


class _Plugin:
    def __init__(self):
        self.sink = _FlakySink()

    @hookimpl
    def distill_teachers(self):
        return [TeacherSpec(name="down", summary="Always fails.", factory=lambda options, context: _DownTeacher())]

    @hookimpl
    def distill_metric_sinks(self):
        return [MetricSinkSpec(name="flaky", summary="Fails after step 2.", factory=lambda options, context: self.sink)]


def _config(tmp_path, manager, tiny_models, *sets, teacher=None):
    teacher = teacher or f'backend = "hf"\nmodel = "{tiny_models["teacher"]}"'
    rows = [{"messages": [{"role": "user", "content": f"What is {a}+{b}?"}], "expected_answer": str(a + b)}
            for a in range(4) for b in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "run.toml").write_text(f"""
output_dir = "{tmp_path / 'out'}"
[student]
model = "{tiny_models['student']}"
[[teachers]]
{teacher}
[data]
train = "train.jsonl"
[sampling]
max_new_tokens = 4
[train]
steps = 4
prompt_groups_per_step = 2
completions_per_prompt = 2
threads = 1
""")
    return load_config(tmp_path / "run.toml", manager, list(sets))


@pytest.mark.slow
def test_a_sink_whose_backend_fails_mid_run_is_counted_and_training_goes_on(tmp_path, tiny_models, manager):
    plugin = _Plugin()
    manager.register(plugin, name="flaky")
    summary = run(_config(tmp_path, manager, tiny_models, "metrics.sinks=['flaky', 'jsonl']"), manager,
                  progress=False)
    assert plugin.sink.written == [1, 2]
    assert summary["metric_sinks"] == {
        "flaky": {"failures": 2, "error": "ConnectionError: tracking server unreachable"},  # steps 3 and 4
        "jsonl": {"failures": 0, "error": None}}
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert read_status(tmp_path / "out")["state"] == "completed"


@pytest.mark.slow
def test_a_failed_run_says_why_in_its_status(tmp_path, tiny_models, manager):
    manager.register(_Plugin(), name="down")
    config = _config(tmp_path, manager, tiny_models, teacher='backend = "down"')
    with pytest.raises(RuntimeError, match="teacher down"):
        run(config, manager, progress=False)
    status = read_status(tmp_path / "out")
    assert (status["state"], status["step"], status["error"]) == ("failed", 0, "RuntimeError: teacher down")
