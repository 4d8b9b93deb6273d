"""Local checkpoints: complete-or-nothing step directories, keep-last-N, a SHA256SUMS manifest
verified on resume, and temporaries removed only once the process that wrote them is gone."""

import hashlib
import signal
import subprocess
import sys

import pytest
import torch
from structlog.testing import capture_logs
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill import SHARDED
from distill.errors import CheckpointError
from distill.plugins.checkpoint_local import MANIFEST, LocalCheckpoints


@pytest.fixture
def model_and_tokenizer(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["student"]), AutoTokenizer.from_pretrained(tiny_models["tokenizer"])


def _save(store, step, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return store.save(step, model=model, tokenizer=tokenizer,
                      trainer_state={"x": torch.tensor([step])}, loop_state={"step": step})


def _leftover(folder, name, *, alive):
    """A temporary of ``name`` as a real process leaves it: killed by SIGKILL mid-write (``alive``
    False), or still writing (a process that keeps running; the caller kills it)."""
    script = (f"import os, pathlib, signal, time; p = pathlib.Path({str(folder)!r}) / f'.tmp-{name}-{{os.getpid()}}'; "
              "p.mkdir(parents=True); (p / 'model.safetensors').write_bytes(b'half'); print(p.name, flush=True); "
              + ("time.sleep(600)" if alive else "os.kill(os.getpid(), signal.SIGKILL)"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    written = folder / proc.stdout.readline().strip()
    if not alive:
        assert proc.wait(timeout=30) == -signal.SIGKILL
    return written, proc


def test_save_latest_prune_and_temporaries_of_dead_runs(tmp_path, model_and_tokenizer):
    store = LocalCheckpoints(tmp_path / "ckpt", tmp_path / "final", keep_last=2)
    assert store.latest() is None
    for step in (1, 2, 3):
        _save(store, step, model_and_tokenizer)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000002", "step-00000003"]

    # a run killed mid-write leaves a temporary directory: never taken as a checkpoint, removed later;
    # one that is still writing keeps its own
    dead, _ = _leftover(tmp_path / "ckpt", "step-00000004", alive=False)
    live, writer = _leftover(tmp_path / "ckpt", "step-00000004", alive=True)
    dead_final, _ = _leftover(tmp_path, "final", alive=False)
    live_final, final_writer = _leftover(tmp_path, "final", alive=True)
    try:
        latest = store.latest()
        assert latest.step == 3 and latest.loop_state == {"step": 3}
        assert latest.trainer_state["x"].tolist() == [3]
        assert AutoModelForCausalLM.from_pretrained(latest.model_dir).config.vocab_size == model_and_tokenizer[0].config.vocab_size
        _save(store, 4, model_and_tokenizer)
        assert not dead.exists() and not dead_final.exists()
        assert (live / "model.safetensors").read_bytes() == b"half"
        assert (live_final / "model.safetensors").read_bytes() == b"half"
    finally:
        writer.kill(), final_writer.kill()
        writer.wait(), final_writer.wait()

    model, tokenizer = model_and_tokenizer
    uri = store.save_final(model=model, tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(uri).get_vocab() == tokenizer.get_vocab()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "final"]  # both writers are gone now
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000003", "step-00000004"]


def test_the_manifest_lists_every_file_with_its_sha256(tmp_path, model_and_tokenizer):
    store = LocalCheckpoints(tmp_path / "ckpt", tmp_path / "final", keep_last=2)
    path = tmp_path / "ckpt" / "step-00000001"
    _save(store, 1, model_and_tokenizer)
    listed = dict(reversed(line.split("  ")) for line in (path / MANIFEST).read_text().splitlines())
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(listed) == files and {"model/model.safetensors", "model/tokenizer.json", "trainer_state.pt",
                                        "loop_state.json"} <= set(files)
    for name, digest in listed.items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest


def _flip_64_bytes(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("damage", "name"), [
    (_flip_64_bytes, "model/model.safetensors"),
    (_truncate, "model/model.safetensors"),
    (_truncate, "model/tokenizer.json"),
    (_truncate, "trainer_state.pt"),
    (_truncate, "loop_state.json"),
])
def test_a_damaged_newest_checkpoint_stops_the_resume_naming_the_file(tmp_path, model_and_tokenizer, damage, name):
    store = LocalCheckpoints(tmp_path / "ckpt", tmp_path / "final", keep_last=2)
    for step in (1, 2):
        _save(store, step, model_and_tokenizer)
    damage(tmp_path / "ckpt" / "step-00000002" / name)
    with pytest.raises(CheckpointError) as err:
        store.latest()
    assert str(err.value) == (
        f"Checkpoint {tmp_path / 'ckpt' / 'step-00000002'} is damaged: {name} does not match its sha256 in "
        f"SHA256SUMS (truncated or altered since it was written). Delete it to resume from the one before, "
        f'or set checkpoint.fallback = "previous" to do that by itself.'
    )


def test_a_missing_file_or_manifest_is_damage_too_and_the_only_checkpoint_says_start_afresh(tmp_path, model_and_tokenizer):
    store = LocalCheckpoints(tmp_path / "ckpt", tmp_path / "final", keep_last=2)
    path = tmp_path / "ckpt" / "step-00000001"
    _save(store, 1, model_and_tokenizer)
    (path / "model" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"is damaged: model/tokenizer.json is missing\. Delete it to start afresh\.$"):
        store.latest()
    (path / MANIFEST).unlink()
    unsealed = (r"is damaged: SHA256SUMS is missing \(cut short, or written by an older distill that did not "
                r"seal checkpoints\)\. Delete it to start afresh\.$")
    with pytest.raises(CheckpointError, match=unsealed):
        store.latest()


def test_fallback_previous_resumes_from_the_newest_intact_checkpoint_with_a_warning(tmp_path, model_and_tokenizer):
    store = LocalCheckpoints(tmp_path / "ckpt", tmp_path / "final", keep_last=3, fallback="previous")
    for step in (1, 2, 3):
        _save(store, step, model_and_tokenizer)
    _flip_64_bytes(tmp_path / "ckpt" / "step-00000003" / "model" / "model.safetensors")
    _truncate(tmp_path / "ckpt" / "step-00000002" / "trainer_state.pt")
    with capture_logs() as logs:
        latest = store.latest()
    assert latest.step == 1 and latest.trainer_state["x"].tolist() == [1]
    assert [(log["log_level"], log["event"]) for log in logs] == [
        ("warning", "damaged checkpoint skipped, trying the one before")] * 2
    assert "step-00000003 is damaged: model/model.safetensors does not match" in logs[0]["problem"]
    assert "step-00000002 is damaged: trainer_state.pt does not match" in logs[1]["problem"]

    # the resumed run's next checkpoint replaces the damaged ones it went back past
    _save(store, 2, model_and_tokenizer)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000001", "step-00000002"]
    assert store.latest().step == 2


def test_fallback_previous_with_every_checkpoint_damaged_stops(tmp_path, model_and_tokenizer):
    store = LocalCheckpoints(tmp_path / "ckpt", tmp_path / "final", keep_last=2, fallback="previous")
    _save(store, 1, model_and_tokenizer)
    _truncate(tmp_path / "ckpt" / "step-00000001" / "model" / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        store.latest()
    assert str(err.value) == (f"Every checkpoint under {tmp_path / 'ckpt'} is damaged (see the warnings above). "
                              "Delete them to start afresh, or choose another output_dir.")


def test_a_sharded_state_is_written_with_dcp_sealed_and_loaded_back_through_its_function(tmp_path, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    store = LocalCheckpoints(tmp_path / "ckpt", tmp_path / "final", keep_last=2)
    sharded = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optimizer": {"state": {"w": {"step": torch.tensor(4.0)}}}}
    store.save(7, model=None, tokenizer=tokenizer, trainer_state={SHARDED: sharded, "scheduler": {"n": 7}},
               loop_state={"step": 7})
    folder = tmp_path / "ckpt" / "step-00000007"
    assert ".metadata" in (folder / MANIFEST).read_text() and not (folder / "model" / "config.json").exists()
    latest = store.latest()
    assert latest.model_dir is None and latest.trainer_state["scheduler"] == {"n": 7}
    into = {"model": {"w": torch.zeros(2, 3)}, "optimizer": {"state": {"w": {"step": torch.tensor(0.0)}}}}
    latest.trainer_state[SHARDED](into)
    assert torch.equal(into["model"]["w"], sharded["model"]["w"])
    assert float(into["optimizer"]["state"]["w"]["step"]) == 4.0
    (folder / "sharded" / "__0_0.distcp").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="sharded/__0_0.distcp does not match its sha256"):
        store.latest()
