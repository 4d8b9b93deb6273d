"""status.json: whole, atomically replaced, throttled per step; ``distill-run status`` prints it."""

import json

from distill import status as status_module
from distill.cli import main
from distill.status import RunStatus, read_status


def test_every_write_is_the_whole_state_and_leaves_no_temporary_file(tmp_path):
    status = RunStatus(tmp_path, total_steps=8)
    status.write("running", step=2, tokens=100)
    status.write("failed", error="RuntimeError: teacher down")
    written = read_status(tmp_path)
    assert {k: written[k] for k in ("state", "step", "total_steps", "percent", "tokens", "error", "signal")} == {
        "state": "failed", "step": 2, "total_steps": 8, "percent": 25.0, "tokens": 100,
        "error": "RuntimeError: teacher down", "signal": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_steps_are_written_at_most_once_a_second(tmp_path, monkeypatch):
    status = RunStatus(tmp_path, total_steps=4)
    status.write("running")
    status.advance(1, tokens=10)  # within a second of the last write: remembered only
    assert read_status(tmp_path)["step"] == 0
    monkeypatch.setattr(status_module, "EVERY_S", 0.0)
    status.advance(2, tokens=20)
    assert (read_status(tmp_path)["step"], read_status(tmp_path)["tokens"]) == (2, 20)
    status.write("completed", step=4)
    assert read_status(tmp_path)["percent"] == 100.0


def test_distill_run_status_prints_the_file_or_says_there_is_none(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 1
    assert "has no status.json" in capsys.readouterr().err
    RunStatus(tmp_path, total_steps=3).write("pending")
    assert main(["status", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == read_status(tmp_path)
