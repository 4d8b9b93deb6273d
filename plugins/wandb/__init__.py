"""Built-in plugin ``wandb``: the run as a Weights & Biases run, with the config, every step's
metrics, held-out results (numbers and a per-route table) and the summary at the end
(``pip install 'distill[wandb]'``).

The API key comes from the environment (``WANDB_API_KEY``) or ``wandb login``, never from the run
config, so it reaches no file distill writes. The W&B run's id and the last step logged to it are
kept in ``<output_dir>/wandb_run.json``: a resumed run continues the same W&B run and logs only the
steps after that one (W&B keeps no step twice, and offline it could not tell).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from distill import BuildContext, MetricSink, MetricSinkSpec, display_config, hookimpl
from distill.plugins._extras import missing_extra

__all__ = ["WandbOptions", "WandbSink"]

RUN_FILE = "wandb_run.json"


@attrs.frozen(kw_only=True)
class WandbOptions:
    project: str = "distill"
    entity: str | None = None
    name: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"


class WandbSink(MetricSink):
    def __init__(self, options: WandbOptions, output_dir: Path, config: Mapping[str, Any]) -> None:
        self.options = options
        self.output_dir = output_dir
        self.config = config
        self.run: Any = None
        self.last_step = -1  # the last step logged to the W&B run, by any attempt
        self._current: int | None = None  # the step this attempt logs to (W&B adds to it until a later one)

    @classmethod
    def build(cls, options: WandbOptions, context: BuildContext) -> WandbSink:
        return cls(options, context.output_dir, display_config(context.run_config))

    def _save(self) -> None:
        path = self.output_dir / RUN_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"id": self.run.id, "step": self.last_step}) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def resume_at(self, step: int) -> None:
        import wandb

        path = self.output_dir / RUN_FILE
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        self.last_step = saved.get("step", -1)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.options.project, entity=self.options.entity,
            name=self.options.name or self.output_dir.resolve().name, mode=self.options.mode,
            dir=str(self.output_dir), id=saved.get("id"), resume="allow", config=dict(self.config),
            settings=wandb.Settings(console="off"),  # our logs are ours: no capture of stdout/stderr
        )
        self._save()

    def _log(self, step: int, values: Mapping[str, Any]) -> None:
        if step <= self.last_step and step != self._current:
            return  # an earlier attempt logged it
        self.run.log(dict(values), step=step)
        self.last_step = self._current = step
        self._save()

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._log(step, {key: value for key, value in metrics.items() if value is not None})

    def write_eval(self, step: int, result: Mapping[str, Any]) -> None:
        import wandb

        routes = {"all rows": result, **result.get("per_route", {})}
        table = wandb.Table(columns=["route", "accuracy", "reverse_kl"],
                            data=[[route, r.get("accuracy"), r.get("reverse_kl")] for route, r in routes.items()])
        self._log(step, {"eval/accuracy": result.get("accuracy"), "eval/reverse_kl": result.get("reverse_kl"),
                         "eval/table": table})

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(summary))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


@hookimpl
def distill_metric_sinks() -> list[MetricSinkSpec]:
    return [
        MetricSinkSpec(
            name="wandb",
            summary="A Weights & Biases run: config, metrics per step, eval tables, the summary.",
            config_cls=WandbOptions,
            factory=WandbSink.build,
            check=lambda options, context: missing_extra("wandb", "wandb", context.path),
        )
    ]
