"""End-to-end runs on tiny real models: summary, final checkpoint, exact resume after SIGTERM/SIGKILL."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.config import load_config
from distill.errors import ConfigError
from distill.loop import run

from ..conftest import build_model, build_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[2]
ROWS = [{"messages": [{"role": "user", "content": f"What is {a}+{b}?"}], "expected_answer": str(a + b)}
        for a in range(10) for b in range(10)]


def _write_config(tmp_path, models, *, steps=6, extra=""):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:80] + ["broken line", {"messages": 5}])
    write_jsonl(tmp_path / "eval.jsonl", ROWS[80:])
    config = tmp_path / "run.toml"
    config.write_text(f"""
output_dir = "{tmp_path / 'out'}"
seed = 5
[student]
model = "{models['student']}"
[[teachers]]
backend = "hf"
model = "{models['teacher']}"
[data]
train = "train.jsonl"
eval = "eval.jsonl"
[sampling]
max_new_tokens = 5
[train]
steps = {steps}
prompt_groups_per_step = 4
completions_per_prompt = 2
micro_batch_size = 3
learning_rate = 3e-3
warmup_steps = 2
schedule = "cosine"
threads = 1
[checkpoint]
every_steps = 2
keep_last = 2
[eval]
answer_pattern = "Answer: *(\\\\d+)"
{extra}
""")
    return config


def _cli(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "distill.cli", *args], env=env or os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_short_run_writes_metrics_summary_and_a_loadable_final_model(tmp_path, tiny_models, manager):
    config = load_config(_write_config(tmp_path, tiny_models, steps=4), manager)
    summary = run(config, manager, progress=False)
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all(math.isfinite(line["loss"]) and line["completion_tokens"] > 0 for line in lines)
    assert lines[0]["learning_rate"] == pytest.approx(1.5e-3)  # warmup 1/2 of 3e-3
    assert summary["steps"] == 4
    assert summary["tokens"] == sum(line["completion_tokens"] for line in lines)
    assert summary["rows_skipped"] == {"invalid_json": 1, "malformed_messages": 1}
    assert set(summary["time_s"]) == {"sampling", "teacher_scoring", "training", "weight_sync", "eval", "checkpoint"}
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert math.isfinite(summary["reverse_kl_before"]) and math.isfinite(summary["reverse_kl_after"])
    assert json.loads((out / "summary.json").read_text()) == summary
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.vocab_size == len(tokenizer)
    trained = load_file(out / "final" / "model.safetensors")
    initial = load_file(Path(tiny_models["student"]) / "model.safetensors")
    assert any(not (trained[k] == initial[k]).all() for k in initial)


@pytest.mark.slow
def test_topk_forward_kl_runs_end_to_end(tmp_path, tiny_models, manager):
    config = load_config(_write_config(tmp_path, tiny_models, steps=2), manager,
                         ["loss.name=topk_forward_kl", "loss.top_k=4", "data.eval=''"])
    summary = run(config, manager, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < lines[0]["teacher_topk_mass"] <= 1 and summary["loss"] == "topk_forward_kl"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["full_reverse_kl", "generalized_jsd"])
def test_full_vocabulary_losses_run_end_to_end(tmp_path, tiny_models, manager, loss):
    config = load_config(_write_config(tmp_path, tiny_models, steps=2), manager, [f"loss.name={loss}", "data.eval=''"])
    summary = run(config, manager, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert lines[0]["divergence"] > 0 and summary["loss"] == loss and summary["loss_kernel"] == "chunked"


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, tiny_models, manager):
    other = build_tokenizer(tmp_path / "other_tok", alphabet=list("0123456789abc"))
    build_model(tmp_path / "other_teacher", other, seed=3)
    config = load_config(_write_config(tmp_path, tiny_models), manager,
                         [f"teachers.0.model='{tmp_path / 'other_teacher'}'"])
    with pytest.raises(ConfigError) as err:
        run(config, manager, progress=False)
    (problem,) = err.value.problems
    assert problem.startswith(f"teacher '{tmp_path / 'other_teacher'}' does not share the student's vocabulary (19 vs 75 tokens")
    assert problem.endswith("so both must use the same tokenizer @ teachers[0]")


def test_validate_catches_a_misspelt_kernel_and_another_vocabulary_before_any_step(tmp_path, tiny_models):
    other = build_tokenizer(tmp_path / "other_tok", alphabet=list("0123456789abc"))
    build_model(tmp_path / "other_teacher", other, seed=3)
    config = _write_config(tmp_path, tiny_models)

    def validate(*overrides):
        args = [a for o in overrides for a in ("--set", o)]
        return subprocess.run([sys.executable, "-m", "distill.cli", "validate", str(config), *args],
                              capture_output=True, text=True)

    misspelt = validate("loss.kernel=chunkd")
    assert misspelt.returncode == 2
    assert misspelt.stderr == (
        f"distill-run: 1 config error(s) in {config}:\n"
        "  - No installed plugin provides loss kernel 'chunkd' for loss 'sampled_reverse_kl' on cpu/float32. "
        'Use loss.kernel = "auto" or install the plugin that provides it. @ loss.kernel\n'
    )
    foreign = validate(f"teachers.0.model='{tmp_path / 'other_teacher'}'")
    assert foreign.returncode == 2
    (problem,) = foreign.stderr.splitlines()[1:]
    assert problem.startswith(f"  - teacher '{tmp_path / 'other_teacher'}' does not share the student's vocabulary")
    assert problem.endswith("@ teachers[0]")
    empty = tmp_path / "empty"
    empty.mkdir()
    unloadable = validate(f"student.tokenizer='{empty}'")
    assert unloadable.returncode == 2
    (problem,) = unloadable.stderr.splitlines()[1:]
    assert problem.startswith(f"  - cannot load a tokenizer from '{empty}' (") and problem.endswith("@ student.tokenizer")
    assert validate().returncode == 0
    assert not (tmp_path / "out").exists()  # nothing ran


def _wait_for_steps(proc, metrics: Path, count: int, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.01)
    raise AssertionError("run made no progress")


@pytest.mark.slow
@pytest.mark.parametrize(("how", "staleness"), [(signal.SIGTERM, 0), (signal.SIGKILL, 0), (signal.SIGKILL, 1)])
def test_interrupted_then_resumed_run_is_bitwise_equal_to_an_uninterrupted_one(tmp_path, tiny_models, how, staleness):
    """With max_staleness = 1 a checkpoint holds the prefetched rollouts, so the resumed run trains
    on the very rollouts the uninterrupted one did."""
    config = _write_config(tmp_path, tiny_models, steps=12)
    pipelined = ("--set", f"train.max_staleness={staleness}")
    reference = _cli("run", str(config), "--no-progress", "--set", f"output_dir='{tmp_path / 'ref'}'", *pipelined)
    assert reference.wait(timeout=300) == 0, reference.communicate()

    out = tmp_path / "interrupted"
    args = ("run", str(config), "--no-progress", "--set", f"output_dir='{out}'", *pipelined)
    first = _cli(*args)
    _wait_for_steps(first, out / "metrics.jsonl", 5)
    first.send_signal(how)
    code = first.wait(timeout=120)
    _, err = first.communicate()
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert done < 12
    if how == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM, err
        assert "Stopped by SIGTERM after step" in err
        assert (out / "checkpoints" / f"step-{done:08d}").is_dir()  # a checkpoint at the stop
    else:
        assert code == -signal.SIGKILL

    second = _cli(*args)
    assert second.wait(timeout=300) == 0, second.communicate()
    ref_weights = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    resumed = load_file(out / "final" / "model.safetensors")
    assert ref_weights.keys() == resumed.keys()
    for name in ref_weights:
        assert (ref_weights[name] == resumed[name]).all(), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # redone steps replace, never duplicate, their lines


@pytest.mark.slow
def test_a_checkpoint_from_before_the_per_process_loop_state_resumes_exactly(tmp_path, tiny_models, manager):
    """Loop states written before each process kept its own part (``teachers``, ``sampler`` and
    ``prefetched`` at the top) resume as before, prefetched rollouts included."""
    from distill.plugins.checkpoint_local import _seal

    config = _write_config(tmp_path, tiny_models, steps=4)
    pipelined = ["train.max_staleness=1"]
    run(load_config(config, manager, [*pipelined, f"output_dir='{tmp_path / 'ref'}'"]), manager, progress=False)
    out = tmp_path / "old"
    shutil.copytree(tmp_path / "ref", out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    shutil.rmtree(out / "final")
    checkpoint = out / "checkpoints" / "step-00000002"
    state = json.loads((checkpoint / "loop_state.json").read_text())
    (own,) = state.pop("processes")
    assert own["prefetched"]  # the next step's rollouts, which the old format kept too
    state.update(teachers={"books": state.pop("books"), "teachers": own["teachers"]}, sampler=own["sampler"],
                 prefetched=own["prefetched"])
    (checkpoint / "loop_state.json").write_text(json.dumps(state))
    (checkpoint / "SHA256SUMS").unlink()
    _seal(checkpoint)
    summary = run(load_config(config, manager, [*pipelined, f"output_dir='{out}'"]), manager, progress=False)
    assert summary["resumed_from_step"] == 2
    reference = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    resumed = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_no_resume_refuses_an_output_dir_with_checkpoints(tmp_path, tiny_models, manager):
    config = load_config(_write_config(tmp_path, tiny_models, steps=2), manager, ["data.eval=''"])
    run(config, manager, progress=False)
    proc = _cli("run", str(tmp_path / "run.toml"), "--no-resume", "--set", "data.eval=''")
    assert proc.wait(timeout=120) == 1
    assert "already holds checkpoints (latest: step 2)" in proc.communicate()[1]


@pytest.mark.slow
def test_third_party_plugin_package_is_discovered_and_used(tmp_path, tiny_models):
    site = tmp_path / "site"
    source = shutil.copytree(REPO / "tests" / "third_party_plugin", tmp_path / "plugin_source")  # builds write here
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    listing = _cli("plugins", "--json", env=env)
    plugins = {p["name"]: p for p in json.loads(listing.communicate()[0])}
    assert plugins["uniform"]["distribution"] == "distill-uniform-teacher"
    assert plugins["uniform"]["version"] == "0.2.0"
    assert plugins["uniform"]["components"] == [{"kind": "teacher", "name": "uniform"}]

    config = _write_config(tmp_path, tiny_models, steps=2)
    vocab = json.loads((Path(tiny_models["student"]) / "config.json").read_text())["vocab_size"]
    proc = _cli("run", str(config), "--no-progress", "--set", "teachers.0={backend = 'uniform', vocab_size = %d}" % vocab,
                "--set", "data.eval=''", env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["teacher_logprob"] == pytest.approx(-math.log(vocab))


def _distill_run(*args):
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True)


def _sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_validate_and_run_refuse_mistakes_of_files_and_machine_before_anything_runs(tmp_path, tiny_models):
    config = _write_config(tmp_path, tiny_models)
    missing = tmp_path / "missing"

    found = _distill_run("validate", str(config), *_sets(
        f"output_dir='{config}'", "student.device='gpu'", "sampling.max_new_tokens=200",
        f"teachers.0.model='{missing}'"))
    assert found.returncode == 2
    assert found.stderr.splitlines()[1:] == [
        f"  - '{config}' is a file, not a folder: move it or choose another folder @ output_dir",
        "  - unknown device 'gpu'; use 'cpu', 'cuda', 'cuda:N' or 'mps' @ student.device",
        "  - must be below the student's context of 128 tokens (max_position_embeddings), which also holds the "
        "prompt; got 200 @ sampling.max_new_tokens",
        f"  - no folder '{missing}': give the folder of a Hugging Face model or a hub id @ teachers[0]",
    ]

    found = _distill_run("validate", str(config), *_sets(
        f"output_dir='{config}/out'", f"data.train='{tmp_path}'", "data.eval='nowhere.jsonl'"))
    assert found.returncode == 2
    assert found.stderr.splitlines()[1:3] == [
        f"  - '{config}/out' cannot be created: '{config}' is a file; choose another folder @ output_dir",
        f"  - '{tmp_path}' is a folder; give a JSONL file @ data.train",
    ]
    assert "nowhere.jsonl" in found.stderr.splitlines()[3] and found.stderr.endswith(" @ data.eval\n")

    if os.geteuid() == 0:  # root writes anywhere but on a read-only file system
        blocked = Path("/sys")
    else:
        blocked = tmp_path / "read_only"
        blocked.mkdir(mode=0o500)
    found = _distill_run("validate", str(config), *_sets(f"output_dir='{blocked}/out'", "router.name='routed'"))
    assert found.returncode == 2
    assert found.stderr.splitlines()[1:] == [
        f"  - '{blocked}/out' cannot be written (Permission denied: '{blocked}'); choose a folder you can write "
        "to @ output_dir",
        f"  - router 'routed' sends no row of 'train.jsonl' to a teacher (skipped: unknown_route:<missing>: 80); "
        f"give the rows a `teacher` field holding one of '{tiny_models['teacher']}' @ data.train",
    ]

    found = _distill_run("validate", str(config), *_sets(f"checkpoint.directory='{config}'",
                                                         f"metrics.jsonl.path='{tmp_path}'"))
    assert found.returncode == 2
    assert found.stderr.splitlines()[1:] == [
        f"  - '{config}' is a file, not a folder: move it or choose another folder @ checkpoint.directory",
        f"  - '{tmp_path}' is a folder; give the path of a file @ metrics.jsonl.path",
    ]

    student_tokenizer = f"student.tokenizer='{tiny_models['tokenizer']}'"  # so only the model is missing
    refused = _distill_run("run", str(config), "--no-progress", *_sets(student_tokenizer, f"student.model='{missing}'"))
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1] == (
        f"  - no folder '{missing}': give the folder of a Hugging Face model or a hub id @ student.model")
    assert not (tmp_path / "out").exists()  # nothing was written, no model loaded


def test_a_run_whose_every_step_is_skipped_fails_with_the_reasons(tmp_path, tiny_models):
    config = _write_config(tmp_path, tiny_models, steps=1)
    write_jsonl(tmp_path / "train.jsonl", [ROWS[0], {**ROWS[1], "teacher": "math"}])  # only line 2 routes
    proc = _distill_run("run", str(config), "--no-progress", *_sets(
        "router.name='routed'", "teachers.0.route_value='math'", "data.shuffle=false", "data.eval=''",
        "train.prompt_groups_per_step=1"))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        "distill-run: error: Every step was skipped: no row could be scored (unknown_route:<missing>: 1). "
        "Fix what the reasons name and run again with a fresh output_dir.")
    assert not (tmp_path / "out" / "final").exists()
