"""The JSONL metric sink on resume: later steps dropped, a line torn by a crash repaired."""

import json

from structlog.testing import capture_logs

from distill.plugins.metrics import JsonlSink


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_the_steps_to_redo_and_a_torn_last_line_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in (1, 2, 3):
        sink.write(step, {"loss": 0.5})
    sink.close()
    complete = path.read_text()
    path.write_text(complete + '{"step": 4, "loss": 0.')  # power lost in the middle of a write

    with capture_logs() as logs:
        JsonlSink(path).resume_at(2)
    assert path.read_text() == "".join(complete.splitlines(keepends=True)[:2])
    assert logs == [{"event": "dropped incomplete lines from the metrics file, keeping the complete ones",
                     "log_level": "warning", "path": str(path), "lines": [4]}]

    resumed = JsonlSink(path)
    resumed.write(3, {"loss": 0.25})
    resumed.close()
    assert _steps(path) == [1, 2, 3]


def test_resume_keeps_a_complete_last_line_that_lost_only_its_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}')
    with capture_logs() as logs:
        JsonlSink(path).resume_at(2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n' and logs == []
