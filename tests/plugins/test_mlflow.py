"""The mlflow sink, read back with MLflow's own MlflowClient: params, metrics with their steps, a
resume that continues the same MLflow run without logging a step twice, the summary and the final
model as artifacts."""

import json

import pytest

pytestmark = pytest.mark.observability
pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install -e '.[mlflow]'")

from mlflow.tracking import MlflowClient

from distill.plugins.mlflow import MlflowOptions, MlflowSink

CONFIG = {"seed": 3, "train": {"steps": 5}, "teachers": [{"backend": "hf", "model": "teacher"}]}


def test_a_resumed_run_continues_the_same_mlflow_run_and_logs_no_step_twice(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("{}")
    options = MlflowOptions(log_model=True)
    first = MlflowSink(options, tmp_path, CONFIG)
    first.resume_at(0)
    first.write_eval(0, {"accuracy": 0.25, "reverse_kl": 1.5})
    for step in (1, 2, 3, 4):
        first.write(step, {"loss": step / 10, "teacher/big/reverse_kl": step / 100, "teacher/big/failed": None})
    first.close()  # stopped after step 4; the checkpoint is at step 2
    client = MlflowClient(first.tracking_uri)
    run_id = json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"

    resumed = MlflowSink(options, tmp_path, CONFIG)
    resumed.resume_at(2)
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in (3, 4, 5):
        resumed.write(step, {"loss": 1.0, "teacher/big/reverse_kl": 1.0})  # 3 and 4 are already logged
    resumed.write_eval(5, {"accuracy": 0.75, "reverse_kl": 0.5, "per_route": {"add": {"accuracy": 1.0, "reverse_kl": 0.25, "rows": 4}}})
    summary = {"steps": 5, "tokens": 120, "student_accuracy_after": 0.75, "final_model": str(final)}
    resumed.write_summary(summary)
    resumed.close()

    (run,) = client.search_runs([client.get_experiment_by_name("distill").experiment_id])
    assert (run.info.run_id, run.info.status, run.info.run_name) == (run_id, "FINISHED", tmp_path.name)
    assert run.data.params == {"seed": "3", "train.steps": "5", "teachers.0.backend": "hf", "teachers.0.model": "teacher"}
    history = {key: [(m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, key)]
               for key in sorted(run.data.metrics)}
    assert history == {
        "eval/accuracy": [(0, 0.25), (5, 0.75)], "eval/add/accuracy": [(5, 1.0)], "eval/add/reverse_kl": [(5, 0.25)],
        "eval/reverse_kl": [(0, 1.5), (5, 0.5)],
        "loss": [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4), (5, 1.0)],
        "summary/student_accuracy_after": [(5, 0.75)], "summary/tokens": [(5, 120.0)],
        "teacher/big/reverse_kl": [(1, 0.01), (2, 0.02), (3, 0.03), (4, 0.04), (5, 1.0)],
    }
    assert json.loads((tmp_path / "mlflow-artifacts").joinpath(run_id, "artifacts", "summary.json").read_text()) == summary
    assert [a.path for a in client.list_artifacts(run_id, "final")] == ["final/config.json"]
