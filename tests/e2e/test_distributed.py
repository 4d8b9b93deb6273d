"""The demo on two processes (torchrun, gloo, FSDP2) against the same run in one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from ..conftest import write_jsonl

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "examples" / "arithmetic" / "opd.toml"
SETTINGS = ("train.steps=5", "train.threads=1", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
            "eval.every_steps=0", "eval.limit=40")
LORA = "trainer.lora={rank = 4}"


def _command(out: Path, nproc: int, *sets: str) -> list[str]:
    overrides = [arg for value in (*SETTINGS, *sets, f"output_dir='{out}'") for arg in ("--set", value)]
    return [sys.executable, "-m", "distill.cli", "run", str(DEMO), "--no-progress", "--nproc", str(nproc), *overrides]


def _run(out: Path, nproc: int, *sets: str) -> None:
    done = subprocess.run(_command(out, nproc, *sets), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same five steps in one process and in two, evaluated before and after."""
    root = tmp_path_factory.mktemp("distributed")
    _run(root / "one", 1)
    _run(root / "two", 2)
    return root


def test_two_processes_sample_the_same_tokens_and_train_the_same_weights(runs):
    one, two = _metrics(runs / "one"), _metrics(runs / "two")
    assert [m["step"] for m in two] == [1, 2, 3, 4, 5]  # the main process alone writes metrics
    for a, b in zip(one, two, strict=True):
        assert a["completion_tokens"] == b["completion_tokens"]
        # the teacher's logprob of every sampled token, summed: equal only for the same tokens
        assert b["teacher_logprob"] == pytest.approx(a["teacher_logprob"], abs=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    reference, sharded = _weights(runs / "one"), _weights(runs / "two")
    assert sorted(reference) == sorted(sharded)
    assert max(float((reference[k] - sharded[k]).abs().max()) for k in reference) <= 1e-5
    summary = json.loads((runs / "two" / "summary.json").read_text())
    assert summary["tokens"] == sum(m["completion_tokens"] for m in two)


def test_evaluation_split_over_two_processes_gives_the_one_process_results(runs):
    one, two = (json.loads((runs / run / "summary.json").read_text()) for run in ("one", "two"))
    assert two["eval_rows"] == one["eval_rows"] == 40
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert two[key] == one[key]
    for key in ("reverse_kl_before", "reverse_kl_after"):
        assert two[key] == pytest.approx(one[key], abs=1e-5)


def test_a_killed_process_brings_the_job_down_and_the_rerun_resumes_it_bitwise(runs, tmp_path):
    out = tmp_path / "killed"
    job = subprocess.Popen(_command(out, 2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-00000002").is_dir() or len(_metrics(out)) < 3:
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    main_pid = json.loads((out / "status.json").read_text())["pid"]
    os.kill(main_pid, signal.SIGKILL)
    assert job.wait(timeout=120) != 0  # torchrun stops the other process too
    assert not (out / "final").exists()
    _run(out, 2)
    assert _metrics(out)[-1]["step"] == 5
    resumed, uninterrupted = _weights(out), _weights(runs / "two")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.parametrize(("written_by", "resumed_by"), [("two", 1), ("one", 2)])
def test_a_checkpoint_resumes_under_another_number_of_processes(runs, tmp_path, written_by, resumed_by):
    out = tmp_path / "resharded"
    shutil.copytree(runs / written_by, out)
    shutil.rmtree(out / "checkpoints" / "step-00000005")
    shutil.rmtree(out / "final")
    assert (out / "checkpoints" / "step-00000004" / "sharded").is_dir() == (written_by == "two")
    _run(out, resumed_by)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 4
    resumed, uninterrupted = _weights(out), _weights(runs / written_by)
    assert max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in uninterrupted) <= 1e-5


@pytest.mark.parametrize("resumed_by", [2, 1])
def test_rollouts_prefetched_by_each_process_resume_with_it_or_split_anew(runs, tmp_path, resumed_by):
    """With ``max_staleness = 1`` a checkpoint holds the next step's rollouts, each process its share."""
    pipelined = runs / "pipelined"
    if not pipelined.exists():
        _run(pipelined, 2, "train.max_staleness=1")
    out = tmp_path / "resumed"
    shutil.copytree(pipelined, out)
    shutil.rmtree(out / "checkpoints" / "step-00000005")
    shutil.rmtree(out / "final")
    _run(out, resumed_by, "train.max_staleness=1")
    assert _metrics(out)[-1]["completion_tokens"] == _metrics(pipelined)[-1]["completion_tokens"]
    resumed, uninterrupted = _weights(out), _weights(pipelined)
    if resumed_by == 2:
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    else:
        assert max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in uninterrupted) <= 1e-5


@pytest.mark.parametrize("trained", [(), pytest.param((LORA,), marks=pytest.mark.lora, id="lora")])
def test_two_processes_sampling_on_a_server_sync_it_from_the_main_process(tmp_path, trained):
    """The gathered weights (with LoRA, the adapter merged) are what the server then answers with."""
    from tests.plugins.test_fireworks import _serve

    if trained:
        pytest.importorskip("peft", reason="needs the lora extra (pip install 'distill[lora]')")
    proc, base = _serve(DEMO.parent / "student", weights_root=tmp_path)
    try:
        sampler = f"sampler={{backend = 'fireworks', base_url = '{base}', model = 'student'}}"
        _run(tmp_path / "out", 2, "train.steps=3", "eval.at_start=false", sampler, *trained)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # the server answered the gathered weights after every sync: before the run and after each step
    assert summary["sampler"]["syncs"] == 4 and summary["sampler"]["sync_max_gap"] < 1e-4
    assert [m["step"] for m in _metrics(tmp_path / "out")] == [1, 2, 3]


def test_a_process_count_below_one_is_refused_by_name():
    done = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(DEMO), "--nproc", "0"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2
    assert "argument --nproc: must be a whole number of processes, at least 1, got '0'" in done.stderr


def test_bf16_mixed_on_two_processes_computes_the_one_process_step(tmp_path):
    """Layers gathered in bf16 (norms in fp32) under autocast: the same first step as one process;
    then bf16 gradients summed in another order (two shares, not one) move the weights by bf16 noise."""
    bf16 = ("train.steps=2", "checkpoint.every_steps=0", "eval.limit=8", "trainer.precision='bf16-mixed'")
    _run(tmp_path / "one", 1, *bf16)
    _run(tmp_path / "two", 2, *bf16)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-5)
    assert [m["completion_tokens"] for m in two] == [m["completion_tokens"] for m in one]
    reference, sharded = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert max(float((reference[k] - sharded[k]).abs().max()) for k in reference) <= 1e-3


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    pytest.importorskip("peft", reason="needs the lora extra (pip install 'distill[lora]')")
    root = tmp_path_factory.mktemp("lora")
    _run(root / "one", 1, LORA, "eval.limit=8")
    _run(root / "two", 2, LORA, "eval.limit=8")
    return root


@pytest.mark.lora
def test_lora_on_two_processes_trains_the_one_process_adapter(lora_runs):
    from peft import PeftModel
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    one, two = lora_runs / "one", lora_runs / "two"
    for merged in (False, True):
        file = Path("final", *(("model.safetensors",) if merged else ("adapter", "adapter_model.safetensors")))
        reference, sharded = load_file(one / file), load_file(two / file)
        assert sorted(reference) == sorted(sharded)
        assert max(float((reference[k] - sharded[k]).abs().max()) for k in reference) <= 1e-5
    # the sharded checkpoint holds what trains, the adapter: the base comes from student.model
    saved = FileSystemReader(str(two / "checkpoints" / "step-00000004" / "sharded")).read_metadata()
    weights = [key for key in saved.state_dict_metadata if key.startswith("model.")]
    assert weights and all(".lora_" in key for key in weights)
    base = AutoModelForCausalLM.from_pretrained(DEMO.parent / "student")
    adapted = PeftModel.from_pretrained(base, two / "final" / "adapter").merge_and_unload().state_dict()
    merged = load_file(two / "final" / "model.safetensors")
    assert max(float((adapted[k] - merged[k]).abs().max()) for k in merged) <= 1e-6


@pytest.mark.lora
@pytest.mark.parametrize("resumed_by", [2, 1])
def test_a_lora_checkpoint_of_two_processes_resumes(lora_runs, tmp_path, resumed_by):
    out = tmp_path / "resumed"
    shutil.copytree(lora_runs / "two", out)
    shutil.rmtree(out / "checkpoints" / "step-00000005")
    shutil.rmtree(out / "final")
    _run(out, resumed_by, LORA, "eval.limit=8")
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 4
    resumed, uninterrupted = _weights(out), _weights(lora_runs / "two")
    if resumed_by == 2:
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    else:
        assert max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in uninterrupted) <= 1e-5


def test_a_process_whose_whole_share_failed_still_takes_part_and_counters_add_up(tmp_path):
    """Rows alternate between a local teacher and a served one that fails every request, so with
    the data in order one process's whole share fails at every step: it passes through the weights
    adding nothing, the other's rows train, and the summary counts the failures of both processes."""
    from tests.plugins.test_fireworks import _serve

    rows = [json.loads(line) for line in (DEMO.parent / "data" / "train.jsonl").read_text().splitlines()[:8]]
    write_jsonl(tmp_path / "train.jsonl", [{**row, "teacher": ("up", "down")[i % 2]} for i, row in enumerate(rows)])
    proc, base = _serve(DEMO.parent / "teacher", "--served-name", "teacher", faults=("--faults", "500=1.0"))
    try:
        config = tmp_path / "routed.toml"
        config.write_text(f"""
output_dir = "{tmp_path / 'out'}"
[student]
model = "{DEMO.parent / 'student'}"
[[teachers]]
backend = "hf"
model = "{DEMO.parent / 'teacher'}"
route_value = "up"
[[teachers]]
backend = "fireworks"
base_url = "{base}"
model = "teacher"
tokenizer = "{DEMO.parent / 'teacher'}"
route_value = "down"
max_attempts = 1
max_failures_in_a_row = 1000
[router]
name = "routed"
[data]
train = "{tmp_path / 'train.jsonl'}"
shuffle = false
[sampling]
max_new_tokens = 8
[train]
steps = 2
prompt_groups_per_step = 4
completions_per_prompt = 2
threads = 1
[checkpoint]
every_steps = 0
""")
        done = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(config), "--no-progress", "--nproc", "2"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        injected = httpx.get(f"{base}/faults", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = tmp_path / "out"
    metrics, summary = _metrics(out), json.loads((out / "summary.json").read_text())
    assert [m["step"] for m in metrics] == [1, 2] and all(m["completion_tokens"] > 0 for m in metrics)
    assert summary["rows_skipped"] == {"teacher_failed:http_500": 2 * 2 * 2}  # steps x rows x completions
    (served,) = [counters for counters in summary["teachers"].values() if "failed_attempts" in counters]
    assert served["failed_attempts"] == {"http_500": injected["500"]}  # counted by the process that sent them
