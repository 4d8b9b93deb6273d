"""The official ``fireworks-ai`` SDK against ``distill-serve``: its ``DeploymentSampler`` (which
always streams) scores with echo and ``top_logprobs=5`` and samples with ``raw_output`` ids, and
the numbers it parses equal the local teacher's.

Run with ``DISTILL_FIREWORKS_PYTHON=/path/to/venv/bin/python python -m pytest -m fireworks``; .ci/run
makes that venv (``fireworks-ai`` stays out of the core install)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .test_fireworks import _serve

pytestmark = pytest.mark.fireworks
SDK_PYTHON = os.environ.get("DISTILL_FIREWORKS_PYTHON")
if not SDK_PYTHON:
    pytest.skip("set DISTILL_FIREWORKS_PYTHON to a python with fireworks-ai installed (see .ci/run)",
                allow_module_level=True)

TEACHER = Path(__file__).resolve().parents[2] / "examples" / "arithmetic" / "teacher"
SCRIPT = """
import asyncio, json, sys
from fireworks.training.sdk.sampling import DeploymentSampler

DeploymentSampler._RETRY_MAX_ATTEMPTS = 1  # a failure is quick, not ten retries
base, prompts = sys.argv[1], json.loads(sys.argv[2])
sampler = DeploymentSampler(inference_url=base, model="teacher", api_key="dummy")

async def main():
    out = []
    for prompt in prompts:
        (scored,) = await sampler.sample_with_prompt_tokens(prompt, n=1, max_tokens=1, temperature=0.0, echo=True,
                                                            logprobs=True, top_logprobs=5,
                                                            hotload_max_retries=0)
        sampled = await sampler.sample_with_prompt_tokens(prompt, n=2, max_tokens=6, temperature=1.0, logprobs=True,
                                                          hotload_max_retries=0)
        out.append({"scored": {"full": scored.full_tokens, "logprobs": scored.inference_logprobs,
                               "echoed": scored.echoed_prompt_logprob_count, "top_ids": scored.inference_topk_token_ids,
                               "top_logprobs": scored.inference_topk_logprobs},
                    "sampled": [{"full": s.full_tokens, "prompt_len": s.prompt_len, "logprobs": s.inference_logprobs,
                                 "sampling": s.sampling_logprobs, "finish": s.finish_reason} for s in sampled]})
    print(json.dumps(out))

asyncio.run(main())
"""


@torch.no_grad()
def _local(model, ids, top_k=5):
    """Each token's logprob given the ones before it, and the top-k at each of those positions."""
    logprobs = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    top = logprobs.topk(top_k, dim=-1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1), top.indices, top.values


def test_the_sdk_scores_and_samples_through_distill_serve():
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    prompts = [tokenizer.encode(q) for q in ("What is 23+58?", "What is 7+5?")]
    proc, base = _serve(TEACHER, "--served-name", "teacher")
    try:
        run = subprocess.run([SDK_PYTHON, "-c", SCRIPT, base, json.dumps(prompts)], capture_output=True, text=True,
                             timeout=300)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert run.returncode == 0, run.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(TEACHER).eval()
    for prompt, result in zip(prompts, json.loads(run.stdout), strict=True):
        scored = result["scored"]
        assert scored["full"][:len(prompt)] == prompt and len(scored["full"]) == len(prompt) + 1
        logprobs, top_ids, top_logprobs = _local(model, scored["full"])
        # the SDK drops the unconditional first row: P + C - 1 positions, each conditioned on those before
        torch.testing.assert_close(torch.tensor(scored["logprobs"]), logprobs, atol=1e-5, rtol=0)
        assert scored["top_ids"] == top_ids.tolist()
        torch.testing.assert_close(torch.tensor(scored["top_logprobs"]), top_logprobs, atol=1e-5, rtol=0)
        for sample in result["sampled"]:
            assert sample["prompt_len"] == len(prompt) and sample["full"][:len(prompt)] == prompt
            want, _, _ = _local(model, sample["full"])
            torch.testing.assert_close(torch.tensor(sample["logprobs"]), want[len(prompt) - 1:], atol=1e-5, rtol=0)
            assert sample["sampling"] == pytest.approx(sample["logprobs"], abs=1e-5)  # temperature 1, no filters
