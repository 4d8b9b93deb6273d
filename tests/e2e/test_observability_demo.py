"""The demo with every metric sink, stopped by SIGTERM and resumed: each backend, read back with its
own library, holds every step exactly once, with the values ``metrics.jsonl`` holds; the W&B API
key, set in the environment, is in no file of the run."""

import json
import signal

import pytest

from . import demo

pytestmark = [pytest.mark.observability, pytest.mark.slow]
for module in ("tensorboard", "mlflow", "wandb"):
    pytest.importorskip(module, reason=f"{module} is an optional extra: pip install -e '.[tensorboard,mlflow,wandb]'")


def _tensorboard(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in ("train/loss", "eval/accuracy")}


def _mlflow(out):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("distill").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == str(demo.STEPS)
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            for key in ("loss", "eval/accuracy")}


def _wandb(out):
    from ..plugins.test_wandb import read_offline

    attempts = read_offline(out)
    assert len({attempt["id"] for attempt in attempts}) == 1 and len(attempts) == 2
    rows = [row for attempt in attempts for row in attempt["history"]]
    return {key: [(row["_step"], row[key]) for row in rows if key in row] for key in ("loss", "eval/accuracy")}


def test_every_sink_through_a_sigterm_and_a_resume(tmp_path):
    out = tmp_path / "run"
    sinks = ("metrics.sinks=['jsonl', 'tensorboard', 'mlflow', 'wandb']", "metrics.wandb.mode='offline'")
    key = {"WANDB_API_KEY": "local-test-key-4f9a2c"}
    code, err = demo.stop_after(demo.start(out, *sinks, env=key), out / "metrics.jsonl", 2)
    assert code == 128 + signal.SIGTERM, err
    code, err = demo.finish(demo.start(out, *sinks, env=key))
    assert code == 0, err

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    history = json.loads((out / "summary.json").read_text())["eval_history"]
    losses = [(line["step"], pytest.approx(line["loss"], rel=1e-6)) for line in lines]
    accuracy = [(entry["step"], pytest.approx(entry["accuracy"])) for entry in history]
    assert [step for step, _ in losses] == list(range(1, demo.STEPS + 1))
    assert [step for step, _ in accuracy] == [0, 3, 6]

    assert _tensorboard(out) == {"train/loss": losses, "eval/accuracy": accuracy}
    assert _mlflow(out) == {"loss": losses, "eval/accuracy": accuracy}
    assert _wandb(out) == {"loss": losses, "eval/accuracy": accuracy}
    assert json.loads((out / "summary.json").read_text())["metric_sinks"] == {
        name: {"failures": 0, "error": None} for name in ("jsonl", "tensorboard", "mlflow", "wandb")}
    leaked = [path for path in out.rglob("*") if path.is_file() and b"local-test-key-4f9a2c" in path.read_bytes()]
    assert leaked == []
