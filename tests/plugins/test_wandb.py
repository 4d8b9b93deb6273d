"""The wandb sink in offline mode (no network), read back from the run folders W&B writes: the
records of its ``.wandb`` files, parsed with W&B's own protobuf ``Record``. A resumed run
continues the same W&B run and logs no step twice."""

import json
import struct
from pathlib import Path

import pytest

pytestmark = pytest.mark.observability
pytest.importorskip("wandb", reason="wandb is an optional extra: pip install -e '.[wandb]'")

from wandb.proto import wandb_internal_pb2

from distill.plugins.wandb import WandbOptions, WandbSink

BLOCK, HEADER = 32768, 7  # a .wandb file is a LevelDB-style log: 32 KiB blocks of framed records


def records(path: Path):
    """The protobuf records of one ``run-<id>.wandb`` file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # a block's tail too short for a frame is padding
            position += BLOCK - position % BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        pending += data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _items(items) -> dict:
    """Key -> value of W&B's items (the key is in ``key`` or, for history, ``nested_key``)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_offline(output_dir: Path) -> list[dict]:
    """Per offline run folder, in order: its run id, config, history rows and summary updates."""
    attempts = []
    for path in sorted((output_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        attempt = {"id": None, "config": {}, "history": [], "summary": {}}
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                attempt["id"] = record.run.run_id
                attempt["config"] = {k: v for k, v in _items(record.run.config.update).items() if k != "_wandb"}
            elif kind == "history":
                attempt["history"].append({k: v for k, v in _items(record.history.item).items()
                                           if k == "_step" or not k.startswith("_")})
            elif kind == "summary":
                attempt["summary"] |= _items(record.summary.update)
        attempts.append(attempt)
    return attempts


def test_a_resumed_run_continues_the_same_wandb_run_and_logs_no_step_twice(tmp_path):
    options = WandbOptions(mode="offline", project="tests")
    first = WandbSink(options, tmp_path, {"seed": 3})
    first.resume_at(0)
    first.write_eval(0, {"accuracy": 0.25, "reverse_kl": 1.5})
    for step in (1, 2, 3, 4):
        first.write(step, {"loss": step / 10, "teacher/big/reverse_kl": step / 100, "teacher/big/failed": None})
    first.close()  # stopped after step 4; the checkpoint is at step 2

    resumed = WandbSink(options, tmp_path, {"seed": 3})
    resumed.resume_at(2)
    for step in (3, 4, 5):
        resumed.write(step, {"loss": 1.0, "teacher/big/reverse_kl": 1.0})  # 3 and 4 are already logged
    resumed.write_eval(5, {"accuracy": 0.75, "reverse_kl": 0.5, "per_route": {"add": {"accuracy": 1.0, "reverse_kl": 0.25, "rows": 4}}})
    resumed.write_summary({"steps": 5, "student_accuracy_after": 0.75})
    resumed.close()

    before, after = read_offline(tmp_path)
    assert before["id"] == after["id"] == json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    assert before["config"] == after["config"] == {"seed": 3}
    rows = before["history"] + after["history"]
    assert [row["_step"] for row in rows] == [0, 1, 2, 3, 4, 5]
    assert [row.get("loss") for row in rows] == [None, 0.1, 0.2, 0.3, 0.4, 1.0]
    assert [row.get("eval/accuracy") for row in rows] == [0.25, None, None, None, None, 0.75]
    assert after["summary"]["student_accuracy_after"] == 0.75
    (table,) = (tmp_path / "wandb").glob("offline-run-*/files/media/table/eval/table_5_*.table.json")
    assert json.loads(table.read_text())["data"] == [["all rows", 0.75, 0.5], ["add", 1.0, 0.25]]
