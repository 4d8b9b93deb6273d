"""The trainer's claims, checked: micro-batching never changes the gradient, ``normalize = "sum"``
is the token-normalised gradient times the token count, and each schedule gives its learning rates."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.align import build_token_batch
from distill.config import parse_config
from distill.plugins.losses.objectives import SampledReverseKL, SampledReverseKLOptions
from distill.plugins.losses.reference import REFERENCE_KERNEL
from distill.trainer import Trainer, lr_factor
from distill.types import PromptRow, Rollout, TeacherScores

RAW = {"student": {"model": "s"}, "data": {"train": "t.jsonl"}, "teachers": [{"backend": "hf", "model": "t"}]}


def _config(manager, **train):
    return parse_config({**RAW, "train": {"max_grad_norm": 0.0, **train}}, manager)


def _batch(vocab: int, seed: int = 0):
    """Seven rollouts of different prompt and completion lengths with random teacher logprobs."""
    g = torch.Generator().manual_seed(seed)
    rollouts, scores = [], []
    for i in range(7):
        prompt = tuple(torch.randint(6, vocab, (2 + i % 3,), generator=g).tolist())
        length = 1 + (i * 5) % 4
        row = PromptRow(index=i + 1, messages=(), prompt_ids=prompt)
        lp = -torch.rand(length, generator=g, dtype=torch.float64)
        rollouts.append(Rollout(row=row, completion_ids_C=torch.randint(6, vocab, (length,), generator=g),
                                sampling_logprobs_C=lp, model_logprobs_C=lp, finished=True))
        scores.append(TeacherScores(logprobs_C=-torch.rand(length, generator=g, dtype=torch.float64)))
    return build_token_batch(rollouts, scores, pad_id=0)


def _gradients(tiny_models, config):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float64)
    trainer = Trainer(model, config, SampledReverseKL(SampledReverseKLOptions()), REFERENCE_KERNEL)
    metrics = trainer.train_step(_batch(model.config.vocab_size))
    return [p.grad.clone() for p in trainer.parameters], metrics


def test_micro_batching_never_changes_the_gradient(tiny_models, manager):
    whole, whole_metrics = _gradients(tiny_models, _config(manager, micro_batch_size=64))
    single, single_metrics = _gradients(tiny_models, _config(manager, micro_batch_size=1))
    assert any(g.abs().max() > 1e-4 for g in whole)
    for a, b in zip(whole, single, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert whole_metrics["loss"] == pytest.approx(single_metrics["loss"], abs=1e-9)


def test_sum_normalisation_is_the_token_mean_times_the_token_count(tiny_models, manager):
    mean, _ = _gradients(tiny_models, _config(manager))
    total, _ = _gradients(tiny_models, parse_config({**RAW, "train": {"max_grad_norm": 0.0},
                                                      "loss": {"normalize": "sum"}}, manager))
    tokens = _batch(75).num_tokens
    for a, b in zip(mean, total, strict=True):
        torch.testing.assert_close(a * tokens, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(("schedule", "expected"), [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.0]),
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0]),
])
def test_each_schedule_warms_up_then_decays_to_its_end(manager, schedule, expected):
    train = _config(manager, steps=10, warmup_steps=2, schedule=schedule).train
    assert [lr_factor(step, train) for step in (0, 1, 2, 4, 6, 10)] == pytest.approx(expected)


def test_the_optimizer_follows_the_schedule(tiny_models, manager):
    config = _config(manager, steps=4, warmup_steps=2, schedule="linear", learning_rate=0.1)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float64)
    trainer = Trainer(model, config, SampledReverseKL(SampledReverseKLOptions()), REFERENCE_KERNEL)
    batch = _batch(model.config.vocab_size)
    rates = [trainer.train_step(batch)["learning_rate"] for _ in range(4)]
    assert rates == pytest.approx([0.05, 0.1, 0.1, 0.05])
