"""distill.testing: the built-in components keep the contract, and broken components are named."""

import asyncio
import importlib.util
from pathlib import Path

import attrs
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.plugins.hf.sampler import HFSampler
from distill.plugins.hf.teacher import HFTeacher
from distill.testing import check_same_scores, check_sampler, check_teacher, default_requests
from distill.types import SamplingParams, ScoreFailure, TeacherScores

UNIFORM = Path(__file__).resolve().parents[1] / "third_party_plugin" / "distill_uniform_teacher" / "__init__.py"


@pytest.mark.parametrize("top_k", [0, 1, 4])
def test_the_hf_teacher_keeps_the_contract(tiny_models, top_k):
    teacher = HFTeacher(AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]), None, batch_size=2)
    asyncio.run(check_teacher(teacher, top_k=top_k))


def test_the_hf_sampler_keeps_the_contract(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    sampler = HFSampler(model, AutoTokenizer.from_pretrained(tiny_models["tokenizer"]), batch_size=3)
    asyncio.run(check_sampler(sampler, params=SamplingParams(max_new_tokens=5, temperature=0.8, top_k=8, n=3)))


def test_the_third_party_uniform_teacher_keeps_the_contract():
    spec = importlib.util.spec_from_file_location("uniform_teacher_under_test", UNIFORM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    asyncio.run(check_teacher(module.UniformTeacher(vocab_size=16), top_k=3))


@attrs.define
class _Broken:
    """A teacher that gets one thing wrong, as a plugin under development might."""

    fault: str

    async def score(self, requests, *, top_k):
        results = []
        for request in requests:
            C = len(request.completion_ids)
            logprobs = torch.full((C,), -1.0)
            ids = torch.arange(top_k).repeat(C, 1)
            top = torch.linspace(-0.5, -3.0, top_k).repeat(C, 1) if top_k else torch.zeros(C, 0)
            if self.fault == "one_short":
                logprobs = logprobs[:-1]
            elif self.fault == "positive":
                logprobs = logprobs + 2
            elif self.fault == "unsorted":
                top = top.flip(1)
            elif self.fault == "duplicate_ids":
                ids[:, 1] = ids[:, 0]
            elif self.fault == "float_ids":
                ids = ids.float()
            elif self.fault == "out_of_vocabulary":
                ids[:, 0] = 16
            elif self.fault == "logprobs_only":
                top_k = 0
            elif self.fault == "silent_failure":
                results.append(ScoreFailure(reason=""))
                continue
            results.append(TeacherScores(logprobs_C=logprobs, topk_ids_C_K=ids if top_k else None,
                                         topk_logprobs_C_K=top if top_k else None))
        return results[:-1] if self.fault == "drops_a_request" else results


@pytest.mark.parametrize(("fault", "rule"), [
    ("one_short", "one entry per completion token"),
    ("positive", "finite log-probabilities"),
    ("unsorted", "sorted by logprob"),
    ("duplicate_ids", "distinct"),
    ("silent_failure", "non-empty reason"),
    ("drops_a_request", "2 results for 3 requests"),
    ("float_ids", r"topk_ids_C_K must be torch.long vocabulary ids, got torch.float32 \(request 0\)"),
    ("out_of_vocabulary", r"topk_ids_C_K must be vocabulary ids in \[0, 16\) \(request 0, position 0\)"),
])
def test_a_broken_teacher_is_named_with_the_rule_it_breaks(fault, rule):
    with pytest.raises(AssertionError, match=rule):
        asyncio.run(check_teacher(_Broken(fault), top_k=3, requests=default_requests(), vocab_size=16))


def test_check_teacher_asks_for_top_k_by_default():
    with pytest.raises(AssertionError, match=r"^topk_ids_C_K must be a torch.Tensor, got NoneType \(request 0\)$"):
        asyncio.run(check_teacher(_Broken("logprobs_only")))
    asyncio.run(check_teacher(_Broken("logprobs_only"), top_k=0))  # a logprobs-only teacher says so


def test_a_sampler_that_ignores_its_seed_is_caught(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    sampler = HFSampler(model, AutoTokenizer.from_pretrained(tiny_models["tokenizer"]), batch_size=3)
    original = sampler.sample
    calls = iter(range(100))

    async def unseeded(rows, params, *, seeds):
        return await original(rows, params, seeds=[seed + next(calls) for seed in seeds])

    sampler.sample = unseeded
    with pytest.raises(AssertionError, match="same seeds and weights must give the same rollouts"):
        asyncio.run(check_sampler(sampler, params=SamplingParams(max_new_tokens=6, n=4)))


def test_a_sampler_whose_rows_share_one_random_stream_is_caught(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    sampler = HFSampler(model, AutoTokenizer.from_pretrained(tiny_models["tokenizer"]), batch_size=3)
    original = sampler.sample

    async def one_stream(rows, params, *, seeds):  # every row seeded from the call's first seed
        return await original(rows, params, seeds=[seeds[0] + i for i in range(len(rows))])

    sampler.sample = one_stream
    with pytest.raises(AssertionError, match="a row sampled alone must get the completions it got beside"):
        asyncio.run(check_sampler(sampler, params=SamplingParams(max_new_tokens=6, n=4)))


def test_two_teachers_scoring_alike_pass_and_a_drift_above_the_tolerance_is_named(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    reference, same = HFTeacher(model, None, batch_size=8), HFTeacher(model, None, batch_size=1)
    asyncio.run(check_same_scores(same, reference, top_k=3))

    class Drifting(HFTeacher):
        async def score(self, requests, *, top_k):
            scores = await super().score(requests, top_k=top_k)
            return [attrs.evolve(s, logprobs_C=s.logprobs_C - 1e-3) for s in scores]

    with pytest.raises(AssertionError, match=r"logprobs differ from the reference's by more than 0.0001 \(request 0\)"):
        asyncio.run(check_same_scores(Drifting(model, None, batch_size=8), reference, top_k=3))
