"""The local transformers sampler and teacher, against teacher-forced forwards of the same model."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.plugins.hf.generation import _inverse_cdf, generate
from distill.plugins.hf.sampler import HFSampler
from distill.plugins.hf.teacher import HFTeacher
from distill.types import PromptRow, SamplingParams, ScoreRequest

PROMPTS = [(2, 30, 31, 32, 5, 3), (2, 40, 41, 5, 3), (2, 33, 5, 3)]


@pytest.fixture(scope="module")
def model(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["student"])


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["tokenizer"])


def _forward_logprobs(model, prompt, completion):
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(completion)])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) + len(completion) - 1]


def _sample(model, prompts=PROMPTS, **kwargs):
    seed = kwargs.pop("seed", 0)
    return generate(model, prompts, max_new_tokens=6, eos_id=1, pad_id=0,
                    seeds=[seed * 100 + len(p) for p in prompts], **kwargs)


def test_untempered_sampling_logprobs_match_a_teacher_forced_forward(model):
    for prompt, out in zip(PROMPTS, _sample(model), strict=True):
        expected = _forward_logprobs(model, prompt, out.ids_C).gather(1, out.ids_C[:, None]).squeeze(1)
        torch.testing.assert_close(out.model_logprobs_C, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.sampling_logprobs_C, out.model_logprobs_C)


def test_temperature_and_top_k_change_the_behaviour_logprob_but_not_the_model_logprob(model):
    for prompt, out in zip(PROMPTS, _sample(model, temperature=0.7, top_k=5), strict=True):
        full = _forward_logprobs(model, prompt, out.ids_C)
        torch.testing.assert_close(out.model_logprobs_C, full.gather(1, out.ids_C[:, None]).squeeze(1), atol=1e-5, rtol=1e-5)
        logits = full / 0.7  # log-softmax shifts do not matter for the filtered distribution
        top5 = torch.topk(logits, 5, -1)
        assert all(int(t) in top5.indices[j].tolist() for j, t in enumerate(out.ids_C))
        filtered = torch.full_like(logits, float("-inf")).scatter(1, top5.indices, top5.values)
        expected = torch.log_softmax(filtered, -1).gather(1, out.ids_C[:, None]).squeeze(1)
        torch.testing.assert_close(out.sampling_logprobs_C, expected, atol=1e-5, rtol=1e-5)
        assert (out.sampling_logprobs_C > out.model_logprobs_C).all()


def test_top_p_keeps_the_smallest_set_reaching_p(model):
    outs = _sample(model, top_p=0.3, seed=5)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        probs = _forward_logprobs(model, prompt, out.ids_C).exp()
        for j, token in enumerate(out.ids_C.tolist()):
            sorted_probs, order = torch.sort(probs[j], descending=True)
            keep = int(((sorted_probs.cumsum(0) - sorted_probs) < 0.3).sum())
            kept = order[:keep]
            assert token in kept.tolist()
            expected = torch.log(probs[j, token] / probs[j, kept].sum())
            assert float(out.sampling_logprobs_C[j]) == pytest.approx(float(expected), abs=1e-5)


def test_sampling_is_deterministic_for_a_seed(model):
    first, again, other = _sample(model, seed=11), _sample(model, seed=11), _sample(model, seed=12)
    assert [o.ids_C.tolist() for o in first] == [o.ids_C.tolist() for o in again]
    assert [o.ids_C.tolist() for o in first] != [o.ids_C.tolist() for o in other]


def test_a_prompt_samples_the_same_alone_as_in_a_batch(model):
    together = _sample(model, seed=3, temperature=0.9)
    alone = [_sample(model, [prompt], seed=3, temperature=0.9)[0] for prompt in PROMPTS]
    assert [o.ids_C.tolist() for o in together] == [o.ids_C.tolist() for o in alone]


def test_inverse_cdf_draws_each_token_in_proportion_and_never_a_masked_one():
    probs = torch.tensor([0.5, 0.0, 0.25, 0.25])
    n = 4096
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # evenly spread: exact proportions
    uniforms = torch.cat([uniforms, torch.tensor([1.0 - 2**-53])])  # the largest uniform rand gives
    ids = _inverse_cdf(probs.log().expand(n + 1, 4), uniforms)
    counts = torch.bincount(ids[:n], minlength=4).tolist()
    assert counts == [n // 2, 0, n // 4, n // 4]
    assert int(ids[n]) == 3


def test_eos_ends_and_flags_a_completion_and_max_tokens_truncates(model):
    greedy = generate(model, PROMPTS[:1], max_new_tokens=4, eos_id=1, pad_id=0, greedy=True)[0]
    first_token = int(greedy.ids_C[0])
    stopped = generate(model, PROMPTS[:1], max_new_tokens=4, eos_id=first_token, pad_id=0, greedy=True)[0]
    assert stopped.ids_C.tolist() == [first_token] and stopped.finished
    if 1 not in greedy.ids_C.tolist():
        assert len(greedy.ids_C) == 4 and not greedy.finished


def test_sampler_groups_n_completions_per_row(model, tokenizer):
    rows = [PromptRow(index=i, messages=(), prompt_ids=p)
            for i, p in enumerate(PROMPTS)]
    sampler = HFSampler(model, tokenizer, batch_size=4)  # chunks of 4 across rows
    rollouts = asyncio.run(sampler.sample(rows, SamplingParams(max_new_tokens=3, n=2), seeds=[1, 2, 3]))
    assert [r.row.index for r in rollouts] == [0, 0, 1, 1, 2, 2]
    again = asyncio.run(sampler.sample(rows, SamplingParams(max_new_tokens=3, n=2), seeds=[1, 2, 3]))
    assert [r.completion_ids_C.tolist() for r in rollouts] == [r.completion_ids_C.tolist() for r in again]


def test_teacher_top_k_up_to_the_whole_vocabulary(model, tokenizer):
    teacher = HFTeacher(model, tokenizer, batch_size=2)
    V = model.config.vocab_size
    requests = [ScoreRequest(prompt_ids=p, completion_ids=(20, 21, 1)) for p in PROMPTS]
    scores = asyncio.run(teacher.score(requests, top_k=V))
    for request, score in zip(requests, scores, strict=True):
        full = _forward_logprobs(model, request.prompt_ids, request.completion_ids)
        torch.testing.assert_close(score.logprobs_C, full[:, [20, 21, 1]].diagonal(), atol=1e-5, rtol=1e-5)
        assert score.topk_ids_C_K.shape == (3, V)
        torch.testing.assert_close(score.topk_logprobs_C_K.exp().sum(-1), torch.ones(3), atol=1e-5, rtol=1e-5)
        assert (score.topk_logprobs_C_K[:, :-1] >= score.topk_logprobs_C_K[:, 1:]).all()
