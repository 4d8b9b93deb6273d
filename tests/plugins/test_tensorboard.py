"""The tensorboard sink, read back with TensorBoard's own EventAccumulator: tags, a resume that
writes no step twice, a backend that fails mid-run."""

import json

import pytest

from distill.loop import run

pytestmark = pytest.mark.observability
pytest.importorskip("tensorboard", reason="tensorboard is an optional extra: pip install -e '.[tensorboard]'")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from distill.plugins.tensorboard import TensorBoardSink

from ..e2e.test_observability import _config


def _read(log_dir):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def _steps(events, tag):
    return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]


def test_a_resumed_sink_appends_and_writes_no_step_twice(tmp_path):
    first = TensorBoardSink(tmp_path, {"seed": 3})
    first.resume_at(0)
    first.write_eval(0, {"accuracy": 0.25, "reverse_kl": 1.5, "per_route": {"add": {"accuracy": 0.5, "reverse_kl": 1.0, "rows": 2}}})
    for step in (1, 2, 3, 4):
        first.write(step, {"loss": step / 10, "teacher/big/reverse_kl": step / 100, "teacher/big/failed": None})
    first.close()  # killed after step 4; the checkpoint is at step 2

    resumed = TensorBoardSink(tmp_path, {"seed": 3})
    resumed.resume_at(2)
    for step in (3, 4, 5):
        resumed.write(step, {"loss": 1.0, "teacher/big/reverse_kl": 1.0})  # 3 and 4 are already written
    resumed.write_eval(5, {"accuracy": 0.75, "reverse_kl": 0.5})
    resumed.close()

    events = _read(tmp_path)
    assert sorted(events.Tags()["scalars"]) == ["eval/accuracy", "eval/add/accuracy", "eval/add/reverse_kl",
                                                "eval/reverse_kl", "teacher/big/reverse_kl", "train/loss"]
    assert _steps(events, "train/loss") == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4), (5, 1.0)]
    assert _steps(events, "eval/accuracy") == [(0, 0.25), (5, 0.75)]
    [config] = events.Tensors("config/text_summary")
    assert json.loads(config.tensor_proto.string_val[0].decode().strip("`\n")) == {"seed": 3}


@pytest.mark.slow
def test_a_backend_that_fails_mid_run_costs_its_steps_not_the_run(tmp_path, tiny_models, manager, monkeypatch):
    add_scalar = SummaryWriter.add_scalar

    def failing_from_step_3(self, tag, value, step, *args, **kwargs):
        if step >= 3:
            raise OSError("No space left on device")
        add_scalar(self, tag, value, step, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", failing_from_step_3)
    summary = run(_config(tmp_path, manager, tiny_models, "metrics.sinks=['jsonl', 'tensorboard']"), manager,
                  progress=False)
    assert summary["metric_sinks"]["tensorboard"] == {"failures": 2, "error": "OSError: No space left on device"}
    assert [step for step, _ in _steps(_read(tmp_path / "out" / "tensorboard"), "train/loss")] == [1, 2]
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 4

