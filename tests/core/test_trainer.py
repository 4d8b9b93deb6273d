"""The trainer's claims, checked: with every default it is the plain step it replaced, bit for bit;
micro-batching never changes the gradient, ``normalize = "sum"`` and ``"sequence"`` are the
token-normalised gradient rescaled, gradient checkpointing changes no gradient, bf16-mixed follows
fp32's loss, each schedule gives its learning rates, bf16 on a device without it and LoRA options
are checked at config time, and a third-party trainer backend is selected by config (LoRA training
itself: tests/e2e/test_lora.py)."""

import math
import sys
from pathlib import Path

import attrs
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill import completion_hidden_states, head_weight
from distill.align import build_token_batch
from distill.config import config_context, load_config, parse_config
from distill.errors import ConfigError
from distill.plugins.losses.objectives import SampledReverseKL, SampledReverseKLOptions
from distill.plugins.losses.reference import REFERENCE_KERNEL
from distill.plugins.torch_trainer import TorchTrainer, TorchTrainerOptions, checkpoint_activations
from distill.types import BuildContext, PromptRow, Rollout, TeacherScores

DEMO = Path(__file__).resolve().parents[2] / "examples" / "arithmetic"
RAW = {"student": {"model": "s"}, "data": {"train": "t.jsonl"}, "teachers": [{"backend": "hf", "model": "t"}]}


def _config(manager, normalize="token", **train):
    return parse_config({**RAW, "train": {"max_grad_norm": 0.0, **train}, "loss": {"normalize": normalize}}, manager)


def _trainer(tiny_models, config, dtype=torch.float64, **options):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=dtype)
    if options.get("gradient_checkpointing"):
        checkpoint_activations(model)
    return TorchTrainer(model, config, TorchTrainerOptions(**options),
                        SampledReverseKL(SampledReverseKLOptions()), REFERENCE_KERNEL)


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


def _gradients(tiny_models, config, dtype=torch.float64, **options):
    trainer = _trainer(tiny_models, config, dtype, **options)
    metrics = trainer.train_step(_batch(trainer.model.config.vocab_size))
    return [p.grad.clone() for p in trainer.parameters], metrics


@pytest.mark.slow
def test_the_default_torch_trainer_is_the_plain_step_bit_for_bit(manager, tmp_path):
    """With every default, 20 steps of the ``torch`` trainer, built by its factory as a run builds
    it, leave the demo student's weights bit for bit where the step distill took before trainers
    were a component leaves them (089dad5's core/trainer.py, written out below): one forward to the
    completion hidden states, the objective through the same kernel, the sum over the step's
    tokens, clipping, AdamW and the schedule. 20 fixed batches; the schedule warms up and decays."""
    config = load_config(DEMO / "opd.toml", manager, [f"output_dir='{tmp_path}'", "train.steps=20",
                                                      "train.warmup_steps=5"])
    train = config.train
    assert config.trainer.options == TorchTrainerOptions() and train.max_grad_norm > 0
    context = config_context(config, manager)
    objective = manager.build("loss", config.loss.name, config.loss.options, context)
    trainer = manager.build("trainer", "torch", config.trainer.options, attrs.evolve(
        context, path="trainer", student_path=str(DEMO / "student"), objective=objective,
        kernel_for=lambda device, dtype: manager.select_loss_kernel(
            loss=config.loss.name, kernel=config.loss.kernel, device=device, dtype=dtype)))

    model = AutoModelForCausalLM.from_pretrained(DEMO / "student", dtype=torch.float32)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=train.learning_rate, betas=train.adam_betas,
                                  eps=train.adam_eps, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.lr_factor)
    start = [p.clone() for p in parameters]
    for seed in range(20):
        batch = _batch(model.config.vocab_size, seed)
        assert batch.num_sequences <= train.micro_batch_size  # one micro-batch, as in the plain step
        trainer.train_step(batch)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        hidden_N_H = completion_hidden_states(model, batch.input_ids_B_L, batch.attention_mask_B_L,
                                              batch.positions_B_C, batch.mask_B_C)
        loss_sum, _ = objective.loss(hidden_N_H, head_weight(model), trainer.kernel, batch)
        (loss_sum / batch.num_tokens).backward()
        torch.nn.utils.clip_grad_norm_(parameters, train.max_grad_norm)
        optimizer.step()
        scheduler.step()

    trained = list(trainer.model.parameters())
    assert [p.shape for p in trained] == [p.shape for p in parameters]
    assert all(torch.equal(a, b) for a, b in zip(trained, parameters, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(start, parameters, strict=True))  # every weight moved


def test_micro_batching_never_changes_the_gradient(tiny_models, manager):
    whole, whole_metrics = _gradients(tiny_models, _config(manager, micro_batch_size=64))
    single, single_metrics = _gradients(tiny_models, _config(manager, micro_batch_size=1))
    assert any(g.abs().max() > 1e-4 for g in whole)
    for a, b in zip(whole, single, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert whole_metrics["loss"] == pytest.approx(single_metrics["loss"], abs=1e-9)


def test_sum_normalisation_is_the_token_mean_times_the_token_count(tiny_models, manager):
    mean, _ = _gradients(tiny_models, _config(manager))
    total, _ = _gradients(tiny_models, _config(manager, normalize="sum"))
    tokens = _batch(75).num_tokens
    for a, b in zip(mean, total, strict=True):
        torch.testing.assert_close(a * tokens, b, atol=1e-9, rtol=1e-9)


def test_sequence_normalisation_divides_by_the_sequences_whatever_the_micro_batch(tiny_models, manager):
    mean, _ = _gradients(tiny_models, _config(manager))
    whole, _ = _gradients(tiny_models, _config(manager, normalize="sequence"))
    single, _ = _gradients(tiny_models, _config(manager, normalize="sequence", micro_batch_size=1))
    batch = _batch(75)
    for a, b, c in zip(mean, whole, single, strict=True):
        torch.testing.assert_close(a * batch.num_tokens / batch.num_sequences, b, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(b, c, atol=1e-9, rtol=0)


def test_gradient_checkpointing_changes_no_gradient(tiny_models, manager):
    plain, _ = _gradients(tiny_models, _config(manager), torch.float32)
    checked, _ = _gradients(tiny_models, _config(manager), torch.float32, gradient_checkpointing=True)
    assert any(g.abs().max() > 1e-4 for g in plain)
    for a, b in zip(plain, checked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_bf16_mixed_keeps_fp32_weights_and_follows_the_fp32_loss(tiny_models, manager):
    """20 steps on one batch: bf16 autocast moves each step's loss by at most 0.02 (3% of it) here."""
    config = _config(manager, learning_rate=1e-2)
    losses = {}
    for precision in ("fp32", "bf16-mixed"):
        trainer = _trainer(tiny_models, config, torch.float32, precision=precision)
        batch = _batch(trainer.model.config.vocab_size)
        losses[precision] = [trainer.train_step(batch)["loss"] for _ in range(20)]
        assert all(p.dtype == torch.float32 for p in trainer.parameters)
    assert losses["fp32"][-1] < losses["fp32"][0] - 0.1  # it learns, so the trajectories say something
    assert losses["bf16-mixed"] == pytest.approx(losses["fp32"], abs=0.02)


@pytest.mark.parametrize(("schedule", "expected"), [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.0]),
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0]),
])
def test_each_schedule_warms_up_then_decays_to_its_end(manager, schedule, expected):
    train = _config(manager, steps=10, warmup_steps=2, schedule=schedule).train
    assert [train.lr_factor(step) for step in (0, 1, 2, 4, 6, 10)] == pytest.approx(expected)


def test_the_optimizer_follows_the_schedule(tiny_models, manager):
    config = _config(manager, steps=4, warmup_steps=2, schedule="linear", learning_rate=0.1)
    trainer = _trainer(tiny_models, config)
    batch = _batch(trainer.model.config.vocab_size)
    rates = [trainer.train_step(batch)["learning_rate"] for _ in range(4)]
    assert rates == pytest.approx([0.05, 0.1, 0.1, 0.05])


def test_the_torch_trainer_is_the_default_and_its_options_are_checked(manager):
    config = _config(manager)
    assert (config.trainer.backend, config.trainer.options) == ("torch", TorchTrainerOptions())
    with pytest.raises(ConfigError) as err:
        parse_config({**RAW, "trainer": {"precision": "fp16", "fast": True}}, manager)
    assert err.value.problems == ["must be one of 'fp32', 'bf16-mixed', 'bf16', got 'fp16' @ trainer.precision",
                                  "unknown key 'fast' @ trainer"]
    with pytest.raises(ConfigError) as err:
        parse_config({**RAW, "student": {"model": "s", "dtype": "bfloat16"}, "trainer": {"precision": "bf16"}}, manager)
    assert err.value.problems == [
        "precision 'bf16' chooses the weights' dtype itself, but student.dtype is 'bfloat16': leave "
        "student.dtype at 'float32' or set precision = 'fp32' @ trainer.precision"]


@pytest.mark.parametrize(("device", "why"), [
    ("cuda:7", "this machine has "),  # no CUDA here; on a GPU machine, fewer than 8 of them
    ("tpu", "unknown device 'tpu'"),
])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_device_this_machine_lacks_is_a_config_error_whatever_the_precision(manager, precision, device, why):
    with pytest.raises(ConfigError) as err:
        parse_config({**RAW, "trainer": {"precision": precision, "device": device}}, manager)
    [problem] = err.value.problems
    assert problem.startswith(why) and problem.endswith(" @ trainer.device")


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_bf16_on_a_device_without_it_is_a_config_error(manager, precision):
    """bf16 on a device that torch cannot vouch for is refused with its path (a CPU always has it).
    A CUDA device that is present but lacks bf16 (pre-Ampere) is not mocked here."""
    with pytest.raises(ConfigError) as err:
        parse_config({**RAW, "trainer": {"precision": precision, "device": "xla"}}, manager)
    [problem] = err.value.problems
    assert problem == (f"precision '{precision}' computes in bfloat16, but distill cannot tell whether 'xla' has it "
                       f"(torch.xla has no is_bf16_supported): set precision = 'fp32' or choose another "
                       f"trainer.device @ trainer.precision")
    parse_config({**RAW, "trainer": {"precision": precision, "device": "cpu"}}, manager)


def test_an_hf_teacher_on_a_device_this_machine_lacks_is_a_config_error(manager):
    with pytest.raises(ConfigError) as err:
        parse_config({**RAW, "teachers": [{"model": "t", "device": "cuda:3"}]}, manager)
    [problem] = err.value.problems
    assert problem.startswith("this machine has ") and problem.endswith(" @ teachers[0].device")


def test_lora_options_are_checked_at_config_time(manager, monkeypatch, tmp_path):
    """Without peft, and with a warm start that is no adapter folder, ``validate`` says so (no model loads)."""
    monkeypatch.setitem(sys.modules, "peft", None)  # what importlib sees when it is not installed
    with pytest.raises(ConfigError) as err:
        parse_config({**RAW, "trainer": {"lora": {"rank": 8, "warm_start_adapter": str(tmp_path)}}}, manager)
    assert err.value.problems == [
        "LoRA trains through peft, which is not installed: pip install 'distill[lora]' @ trainer.lora",
        f"'{tmp_path}' is not a PEFT adapter folder (it has no adapter_config.json) @ trainer.lora.warm_start_adapter"]
    with pytest.raises(ConfigError) as err:
        parse_config({**RAW, "trainer": {"lora": {"rank": 0, "dropout": 1.0}}}, manager)
    assert [p.split(" @ ")[1] for p in err.value.problems] == ["trainer.lora.rank", "trainer.lora.dropout"]


@pytest.fixture
def frozen_trainer(manager, monkeypatch):
    """The third-party package's trainer, registered the way its entry point would."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "third_party_plugin"))
    import distill_frozen_trainer

    manager.register(distill_frozen_trainer, name="frozen_trainer")
    yield manager
    sys.modules.pop("distill_frozen_trainer", None)


def test_a_third_party_trainer_is_selected_by_config(tiny_models, frozen_trainer):
    config = parse_config({**RAW, "trainer": {"backend": "frozen"}}, frozen_trainer)
    context = BuildContext(run_config=config, output_dir=Path("out"), seed=0, device="cpu", path="trainer",
                           student_path=str(tiny_models["student"]), objective=SampledReverseKL(SampledReverseKLOptions()),
                           kernel_for=lambda device, dtype: REFERENCE_KERNEL)
    trainer = frozen_trainer.build("trainer", config.trainer.backend, config.trainer.options, context)
    before = [p.clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step(_batch(trainer.model.config.vocab_size))
    assert metrics["loss"] != 0 and trainer.state_dict() == {"steps": 1}
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
