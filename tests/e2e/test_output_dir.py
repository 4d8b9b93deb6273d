"""One output folder, one run: the folder lock, the config check on resume, and damaged checkpoints
and metrics found and named (or repaired) instead of trained on. Real ``distill-run`` processes."""

import json
import shutil
import signal
import socket

import pytest
from safetensors.torch import load_file

from distill.config import load_config
from distill.loop import run

from .test_run import _cli, _wait_for_steps, _write_config

NO_EVAL = ("--set", "data.eval=''")


def _finish(proc, timeout=300):
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_second_run_into_a_busy_output_dir_exits_at_once_naming_the_holder(tmp_path, tiny_models):
    config = _write_config(tmp_path, tiny_models, steps=12)
    out = tmp_path / "out"
    first = _cli("run", str(config), "--no-progress", *NO_EVAL)
    _wait_for_steps(first, out / "metrics.jsonl", 1)
    first.send_signal(signal.SIGSTOP)  # paused mid-run, lock held, however slowly the second one starts

    second = _cli("run", str(config), "--no-progress", *NO_EVAL, "--set", "seed=6")
    code, err = _finish(second, timeout=120)
    assert code == 2
    assert err == (f"distill-run: 1 config error(s) in {config}:\n  - {out} is in use by another run (PID {first.pid} "
                   f"on {socket.gethostname()}); wait for it to end or stop it, or choose another output_dir "
                   f"(--set output_dir=...) @ output_dir\n")
    assert first.poll() is None  # the holder lives on, its folder untouched
    assert json.loads((out / "config.json").read_text())["seed"] == 5

    first.send_signal(signal.SIGKILL)  # the OS releases the lock: nothing stale to clean up
    assert first.wait(timeout=60) == -signal.SIGKILL
    third = _cli("run", str(config), "--no-progress", *NO_EVAL)
    code, err = _finish(third)
    assert code == 0, err
    assert _steps(out) == list(range(1, 13))  # every step once


@pytest.mark.slow
def test_resuming_under_a_config_that_changes_the_trajectory_is_refused_unless_anyway(tmp_path, tiny_models, manager):
    config = _write_config(tmp_path, tiny_models, steps=2)
    out = tmp_path / "out"
    run(load_config(config, manager, ["data.eval=''"]), manager, progress=False)

    other_seed = ("--set", "seed=6", "--set", "train.steps=3")
    code, err = _finish(_cli("run", str(config), "--no-progress", *NO_EVAL, *other_seed))
    assert code == 2
    assert err == (
        f"distill-run: 3 config error(s) in {config}:\n"
        "  - is 6 in this config but 5 in the checkpoint @ seed\n"
        "  - is 3 in this config but 2 in the checkpoint @ train.steps\n"
        f"  - {out} holds checkpoint {out / 'checkpoints' / 'step-00000002'} of a run with the value(s) above, which "
        "change what it trains: rerun with them, choose another output_dir (--set output_dir=...), or pass "
        "--resume-anyway to continue it with these @ output_dir\n"
    )
    assert _steps(out) == [1, 2]

    code, err = _finish(_cli("run", str(config), "--no-progress", *NO_EVAL, *other_seed, "--resume-anyway"))
    assert code == 0, err
    warning = next(json.loads(line) for line in err.splitlines() if "changes its trajectory" in line)
    assert warning["changed"] == {"seed": {"checkpoint": 5, "now": 6}, "train.steps": {"checkpoint": 2, "now": 3}}
    assert _steps(out) == [1, 2, 3]

    # where and how often it computes, evaluates and writes may change freely
    code, err = _finish(_cli("run", str(config), "--no-progress", *other_seed, "--set", "eval.every_steps=1",
                             "--set", "checkpoint.keep_last=3", "--set", "train.threads=2"))
    assert code == 0, err
    assert "changes its trajectory" not in err


@pytest.mark.slow
def test_damaged_checkpoint_weights_are_named_and_fallback_resumes_from_the_previous_one(tmp_path, tiny_models, manager):
    config = _write_config(tmp_path, tiny_models, steps=4)
    out = tmp_path / "out"
    run(load_config(config, manager, ["data.eval=''"]), manager, progress=False)
    reference = load_file(out / "final" / "model.safetensors")
    newest = out / "checkpoints" / "step-00000004"

    tokenizer = newest / "model" / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:100])
    code, err = _finish(_cli("run", str(config), "--no-progress", *NO_EVAL))
    assert code == 1
    assert err.endswith(f"distill-run: error: Checkpoint {newest} is damaged: model/tokenizer.json does not match "
                        "its sha256 in SHA256SUMS (truncated or altered since it was written). Delete it to resume "
                        'from the one before, or set checkpoint.fallback = "previous" to do that by itself.\n')

    weights = newest / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-200:-136] = bytes(b ^ 0xFF for b in data[-200:-136])  # 64 flipped bytes of one tensor
    weights.write_bytes(bytes(data))
    code, err = _finish(_cli("run", str(config), "--no-progress", *NO_EVAL))
    assert code == 1 and "Traceback" not in err
    assert f"Checkpoint {newest} is damaged: model/model.safetensors does not match its sha256" in err

    code, err = _finish(_cli("run", str(config), "--no-progress", *NO_EVAL, "--set", "checkpoint.fallback='previous'"))
    assert code == 0, err
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    (skipped,) = [log for log in logs if log["event"] == "damaged checkpoint skipped, trying the one before"]
    assert skipped["level"] == "warning" and "model/model.safetensors does not match" in skipped["problem"]
    assert next(log for log in logs if log["event"] == "resumed")["step"] == 2
    resumed = load_file(out / "final" / "model.safetensors")
    assert all((resumed[name] == reference[name]).all() for name in reference)  # resume is exact
    assert _steps(out) == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_torn_last_metrics_line_is_repaired_on_resume(tmp_path, tiny_models, manager):
    """A crash after step 4's metrics line began but before its checkpoint: resume from step 2."""
    config = _write_config(tmp_path, tiny_models, steps=4)
    out = tmp_path / "out"
    run(load_config(config, manager, ["data.eval=''"]), manager, progress=False)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:3]) + lines[3][:40])

    code, err = _finish(_cli("run", str(config), "--no-progress", *NO_EVAL))
    assert code == 0, err
    warning = next(json.loads(line) for line in err.splitlines() if "incomplete lines" in line)
    assert warning["lines"] == [4] and warning["path"] == str(out / "metrics.jsonl")
    assert (out / "metrics.jsonl").read_text().splitlines(keepends=True)[:2] == lines[:2]
    assert _steps(out) == [1, 2, 3, 4]
