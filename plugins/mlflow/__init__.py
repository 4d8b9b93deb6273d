"""Built-in plugin ``mlflow``: the run as an MLflow run, with the config as params, every step's
metrics with their step, held-out results, the summary, and optionally the final model as an
artifact (``pip install 'distill[mlflow]'``).

By default the tracking store is a SQLite file in the run folder (``<output_dir>/mlflow.db``,
artifacts beside it in ``mlflow-artifacts/``): MLflow's file store is deprecated. The MLflow run's
id is kept in ``<output_dir>/mlflow_run.json``, so a resumed run continues the same MLflow run;
it logs no metric at a step the tracking store already holds for it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from distill import BuildContext, MetricSink, MetricSinkSpec, display_config, hookimpl
from distill.plugins._extras import missing_extra

__all__ = ["MlflowOptions", "MlflowSink"]

RUN_FILE = "mlflow_run.json"
SUMMARY_METRICS = ("tokens", "wall_time_s", "teacher_accuracy", "student_accuracy_before",
                   "student_accuracy_after", "reverse_kl_before", "reverse_kl_after")


@attrs.frozen(kw_only=True)
class MlflowOptions:
    tracking_uri: str | None = None
    experiment: str = "distill"
    run_name: str | None = None
    log_model: bool = False


def _flat(node: Any, prefix: str = "") -> dict[str, str]:
    """Nested config as MLflow params: ``train.steps`` -> ``"600"``, list items by index."""
    if isinstance(node, Mapping):
        items = node.items()
    elif isinstance(node, list | tuple):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {prefix: json.dumps(node) if not isinstance(node, str) else node}
    return {k: v for key, value in items for k, v in _flat(value, f"{prefix}.{key}" if prefix else key).items()}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class MlflowSink(MetricSink):
    def __init__(self, options: MlflowOptions, output_dir: Path, config: Mapping[str, Any]) -> None:
        self.options = options
        self.output_dir = output_dir
        self.tracking_uri = options.tracking_uri or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
        self.config = config
        self.client: Any = None
        self.run_id: str | None = None
        self._logged: dict[str, int] = {}  # metric -> last step the store holds
        self._finished = False

    @classmethod
    def build(cls, options: MlflowOptions, context: BuildContext) -> MlflowSink:
        return cls(options, context.output_dir, display_config(context.run_config))

    def _experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(self.options.experiment)
        if experiment is not None:
            return experiment.experiment_id
        local = None if self.options.tracking_uri else (self.output_dir / "mlflow-artifacts").resolve().as_uri()
        return self.client.create_experiment(self.options.experiment, artifact_location=local)

    def _previous_run(self) -> str | None:
        """The MLflow run an earlier attempt of this run logged to, if it is in this store."""
        path = self.output_dir / RUN_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("tracking_uri") != self.tracking_uri:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(saved["run_id"])
        except MlflowException:  # deleted from the store since
            return None
        return saved["run_id"]

    def resume_at(self, step: int) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id = self._previous_run()
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            for key in self.client.get_run(self.run_id).data.metrics:
                self._logged[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))
            return
        run = self.client.create_run(self._experiment(), run_name=self.options.run_name or self.output_dir.resolve().name,
                                     tags={"distill.output_dir": str(self.output_dir.resolve())})
        self.run_id = run.info.run_id
        params = [Param(key, value[:6000]) for key, value in _flat(self.config).items()]  # MLflow's limit
        for start in range(0, len(params), 100):  # at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        record = {"tracking_uri": self.tracking_uri, "run_id": self.run_id}
        (self.output_dir / RUN_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")

    def _log(self, step: int, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()
                 if _number(value) and self._logged.get(key, -1) < step]
        for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])
        for metric in batch:
            self._logged[metric.key] = step

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._log(step, metrics)

    def write_eval(self, step: int, result: Mapping[str, Any]) -> None:
        scalars = {"eval/accuracy": result.get("accuracy"), "eval/reverse_kl": result.get("reverse_kl")}
        for route, numbers in result.get("per_route", {}).items():
            scalars |= {f"eval/{route}/accuracy": numbers["accuracy"], f"eval/{route}/reverse_kl": numbers["reverse_kl"]}
        self._log(step, scalars)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self.client.log_dict(self.run_id, dict(summary), "summary.json")
        self._log(summary["steps"], {f"summary/{key}": summary.get(key) for key in SUMMARY_METRICS})
        if self.options.log_model:
            self.client.log_artifacts(self.run_id, summary["final_model"], "final")
        self._finished = True

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FINISHED" if self._finished else "KILLED")
            self.run_id = None


@hookimpl
def distill_metric_sinks() -> list[MetricSinkSpec]:
    return [
        MetricSinkSpec(
            name="mlflow",
            summary="An MLflow run: config as params, metrics per step, the summary (<output_dir>/mlflow.db).",
            config_cls=MlflowOptions,
            factory=MlflowSink.build,
            check=lambda options, context: missing_extra("mlflow", "mlflow", context.path),
        )
    ]
