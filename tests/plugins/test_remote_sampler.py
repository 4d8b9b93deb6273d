"""The remote student sampler against a real distill-serve on 127.0.0.1: samples, weight sync, faults."""

import asyncio
import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.config import parse_config
from distill.errors import ConfigError, DistillError
from distill.loop import run
from distill.plugins.fireworks import RemoteSamplerOptions
from distill.plugins.fireworks.client import Invalid
from distill.plugins.fireworks.sampler import (
    RemoteSampler,
    parse_completion_ids,
    parse_fireworks_samples,
    parse_vllm_samples,
)
from distill.types import BuildContext, PromptRow, SamplingParams

from .test_fireworks import _serve

PROMPTS = [(2, 30, 31, 5, 3), (2, 33, 5, 3), (4, 40, 41, 42, 43, 5, 2, 33, 5, 3), (2, 34, 35, 5, 3)]
ROWS = [PromptRow(index=i + 1, messages=(), prompt_ids=p) for i, p in enumerate(PROMPTS)]


@pytest.fixture
def student_server(tiny_models, tmp_path):
    proc, base = _serve(tiny_models["student"], weights_root=tmp_path.parent)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def _sampler(base, student, tmp_path, **options):
    opts = RemoteSamplerOptions(base_url=base, model="tiny", backoff_base_s=0.01, **options)
    return RemoteSampler.build(opts, BuildContext(run_config=None, output_dir=tmp_path, seed=0, device="cpu",
                                                  student=student))


@torch.no_grad()
def _local(model, prompt, completion, temperature=1.0):
    """The local model's raw and tempered logprobs of ``completion`` after ``prompt``."""
    ids = torch.tensor([[*prompt, *completion]])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    target = ids[0, len(prompt):, None]
    return (logits.log_softmax(-1).gather(1, target).squeeze(1),
            (logits / temperature).log_softmax(-1).gather(1, target).squeeze(1))


def test_samples_carry_the_servers_raw_and_behaviour_logprobs_exactly(student_server, tiny_models, tmp_path):
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    params = SamplingParams(max_new_tokens=6, temperature=0.7, n=3)

    async def scenario():
        sampler = _sampler(student_server, student, tmp_path)
        try:
            return (await sampler.sample(ROWS, params, seeds=range(11, 15)),
                    await sampler.sample(ROWS, params, seeds=range(11, 15)),
                    await sampler.sample(ROWS, params, seeds=range(12, 16)),
                    await sampler.complete(PROMPTS, max_new_tokens=5))
        finally:
            await sampler.aclose()

    rollouts, again, other, greedy = asyncio.run(scenario())
    assert [r.row.index for r in rollouts] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    for rollout in rollouts:
        raw, tempered = _local(student, rollout.prompt_ids, rollout.completion_ids_C.tolist(), 0.7)
        torch.testing.assert_close(rollout.model_logprobs_C, raw, atol=1e-4, rtol=0)
        torch.testing.assert_close(rollout.sampling_logprobs_C, tempered, atol=1e-4, rtol=0)
        assert rollout.finished == (rollout.completion_ids_C[-1].item() == 1)
    assert [r.completion_ids_C.tolist() for r in again] == [r.completion_ids_C.tolist() for r in rollouts]
    assert [r.completion_ids_C.tolist() for r in other] != [r.completion_ids_C.tolist() for r in rollouts]
    for prompt, ids in zip(PROMPTS, greedy, strict=True):
        with torch.no_grad():
            assert ids[0] == int(student(torch.tensor([prompt])).logits[0, -1].argmax())


def test_weight_sync_serves_the_trained_weights_and_a_stale_server_is_caught(student_server, tiny_models, tmp_path):
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])

    async def scenario():
        sampler = _sampler(student_server, student, tmp_path)
        try:
            await sampler.sync_weights(0)
            with torch.no_grad():  # as a training step would
                for parameter in student.parameters():
                    parameter.add_(0.05 * torch.randn_like(parameter))
            with pytest.raises(DistillError, match="not serving the trained weights"):
                await sampler._check_sync(1)  # the server still holds the step-0 weights
            await sampler.sync_weights(1)
            return sampler.counters(), await sampler.sample(ROWS, SamplingParams(max_new_tokens=6, n=2), seeds=range(4))
        finally:
            await sampler.aclose()

    counters, rollouts = asyncio.run(scenario())
    assert counters["syncs"] == 2 and counters["sync_max_gap"] > 1e-2
    for rollout in rollouts:
        raw, _ = _local(student, rollout.prompt_ids, rollout.completion_ids_C.tolist())
        torch.testing.assert_close(rollout.model_logprobs_C, raw, atol=1e-4, rtol=0)


def test_sync_fails_with_a_hint_when_the_server_cannot_load_weights(tiny_models, tmp_path):
    proc, base = _serve(tiny_models["student"], weights_root=tmp_path.parent)
    try:
        sampler = _sampler(base, AutoModelForCausalLM.from_pretrained(tiny_models["student"]), tmp_path,
                           server_weights_dir=str(tmp_path / "elsewhere"))
        with pytest.raises(DistillError, match=r"Weight sync to 'tiny' failed: /distill/v1/load_weights answered 422: cannot load weights from .*elsewhere"):
            asyncio.run(sampler.sync_weights(0))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sync_to_a_server_without_the_endpoint_says_how_to_enable_it(student_server, tiny_models, tmp_path):
    sampler = _sampler(student_server, AutoModelForCausalLM.from_pretrained(tiny_models["student"]), tmp_path,
                       sync="vllm")  # distill-serve has no /collective_rpc
    with pytest.raises(DistillError, match=r"Weight sync to 'tiny' failed: /collective_rpc answered 404: .*; "
                                           r"start vLLM with VLLM_SERVER_DEV_MODE=1"):
        asyncio.run(sampler.sync_weights(0))


def test_weights_that_do_not_fit_are_refused_and_the_served_model_is_unchanged(student_server, tiny_models, tmp_path):
    from safetensors.torch import save_file

    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    state = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    state["model.norm.weight"] = torch.zeros(3)  # wrong shape
    state["extra.weight"] = torch.zeros(1)
    del state["model.layers.0.mlp.up_proj.weight"]
    for name in state:
        if name.startswith("model.embed_tokens"):
            state[name] = torch.zeros_like(state[name])  # would be copied first by a partial load
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    reply = httpx.post(f"{student_server}/distill/v1/load_weights", json={"path": str(tmp_path / "bad")})
    assert reply.status_code == 422
    assert reply.json()["error"]["message"] == (
        f"cannot load weights from {tmp_path / 'bad'}: weights do not fit the model: missing "
        "['model.layers.0.mlp.up_proj.weight'], unexpected ['extra.weight'], other shape ['model.norm.weight']")

    async def still_the_student():
        sampler = _sampler(student_server, student, tmp_path)
        try:
            await sampler._check_sync(0)  # the served logprobs are still exactly the student's
        finally:
            await sampler.aclose()

    asyncio.run(still_the_student())


def test_injected_faults_on_sampling_are_retried_and_counted_exactly(tiny_models, tmp_path):
    proc, base = _serve(tiny_models["student"], faults=("--faults", "429=0.1,500=0.1,reset=0.05,stall=0.05,truncate=0.1,corrupt=0.1",
                                                              "--fault-seed", "5", "--stall-s", "6"))
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    try:
        sampler = _sampler(base, student, tmp_path, timeout_s=3, max_attempts=12)
        rollouts = asyncio.run(sampler.sample(ROWS * 6, SamplingParams(max_new_tokens=6, n=2), seeds=range(3, 27)))
        injected = httpx.get(f"{base}/faults").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert sum(injected.values()) > 5 and len(rollouts) == 48
    counts = sampler.counters()["failed_attempts"]
    by_kind = {"429": counts.get("http_429", 0), "500": counts.get("http_500", 0), "stall": counts.get("timeout", 0),
               "truncate": counts.get("bad_json", 0), "corrupt": counts.get("invalid:non_finite_logprob", 0),
               "reset": sum(v for k, v in counts.items() if k.startswith("transport:"))}
    assert by_kind == {kind: injected.get(kind, 0) for kind in by_kind}
    for rollout in rollouts:  # every accepted sample is exactly what the model gives
        raw, _ = _local(student, rollout.prompt_ids, rollout.completion_ids_C.tolist())
        torch.testing.assert_close(rollout.model_logprobs_C, raw, atol=1e-4, rtol=0)


def test_a_student_server_that_stays_down_stops_the_run_with_a_clear_message(tiny_models, tmp_path):
    from .test_fireworks import _free_port

    sampler = _sampler(f"http://127.0.0.1:{_free_port()}", AutoModelForCausalLM.from_pretrained(tiny_models["student"]),
                       tmp_path, max_attempts=2)
    with pytest.raises(DistillError, match="student's server 'tiny' failed: .* The last checkpoint is intact"):
        asyncio.run(sampler.sample(ROWS, SamplingParams(max_new_tokens=4), seeds=range(4)))


def _choice(index, ids, logprobs=None, sampling=None, finish="stop"):
    logprobs = logprobs or [-0.5] * len(ids)
    sampling = sampling or logprobs
    return {"index": index, "finish_reason": finish, "raw_output": {"completion_token_ids": ids},
            "logprobs": {"content": [{"token_id": i, "logprob": lp, "sampling_logprob": s}
                                     for i, lp, s in zip(ids, logprobs, sampling, strict=True)]}}


@pytest.mark.parametrize(("body", "reason"), [
    ({"choices": [_choice(0, [5, 6])]}, "missing_choices"),
    ({"choices": [_choice(0, [5, 6]), _choice(1, [])]}, "bad_length"),
    ({"choices": [_choice(0, [5, 6]), _choice(1, [5, 6, 7, 8, 9])]}, "bad_length"),
    ({"choices": [_choice(0, [5, 6]), _choice(1, [5, 6], sampling=[-0.1, float("nan")])]}, "non_finite_logprob"),
    ({"choices": [_choice(0, [5, 6]), {**_choice(1, [5, 6]), "raw_output": {"completion_token_ids": [5, 7]}}]}, "ids_mismatch"),
    ({"choices": [_choice(0, [5, 6]), {"index": 1}]}, "malformed"),
])
def test_fireworks_samples_that_do_not_line_up_are_rejected(body, reason):
    with pytest.raises(Invalid) as caught:
        parse_fireworks_samples(body, n=2, max_tokens=4)
    assert caught.value.reason == reason


def test_sample_parsers_read_ids_logprobs_and_finish():
    (sample,) = parse_fireworks_samples({"choices": [_choice(0, [5, 1], [-0.5, -0.25], [-0.4, -0.2])]}, 1, 4)
    assert (sample.ids, sample.model_logprobs, sample.sampling_logprobs, sample.finished) == ([5, 1], [-0.5, -0.25], [-0.4, -0.2], True)
    body = {"choices": [{"index": 0, "token_ids": [5, 6], "finish_reason": "length",
                         "logprobs": {"token_logprobs": [-0.5, -1.5]}}]}
    (sample,) = parse_vllm_samples(body, 1, 2)
    assert (sample.ids, sample.sampling_logprobs, sample.finished) == ([5, 6], [-0.5, -1.5], False)
    body["choices"][0]["logprobs"]["token_logprobs"] = [-0.5]
    with pytest.raises(Invalid, match="ids_mismatch"):
        parse_vllm_samples(body, 1, 2)
    # greedy completions for evaluation need only ids: a null logprob does not matter there
    assert parse_completion_ids(body, "vllm", 2) == [5, 6]
    greedy = {"choices": [_choice(0, [5, 1], sampling=[None, None])]}
    assert parse_completion_ids(greedy, "fireworks", 4) == [5, 1]
    with pytest.raises(Invalid, match="bad_length"):
        parse_completion_ids(greedy, "fireworks", 1)


def test_the_vllm_backend_needs_unfiltered_temperature_one_sampling(manager, tiny_models, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"}]}) + "\n")
    base = {"student": {"model": str(tiny_models["student"])}, "data": {"train": "train.jsonl"},
            "teachers": [{"backend": "hf", "model": str(tiny_models["teacher"])}],
            "sampler": {"backend": "vllm", "base_url": "http://127.0.0.1:1", "model": "s"}}
    with pytest.raises(ConfigError, match=r"returns raw logprobs only.*@ sampling"):
        parse_config({**base, "sampling": {"temperature": 0.7}}, manager, source=str(tmp_path / "run.toml"))
    parse_config({**base, "sampling": {"temperature": 1.0}}, manager, source=str(tmp_path / "run.toml"))


def test_the_old_dialect_spelling_still_works_with_a_warning_and_contradictions_are_errors(manager, tiny_models,
                                                                                           tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"}]}) + "\n")
    base = {"student": {"model": str(tiny_models["student"])}, "data": {"train": "train.jsonl"},
            "teachers": [{"backend": "hf", "model": str(tiny_models["teacher"])}]}
    old = {"base_url": "http://127.0.0.1:1", "model": "s", "dialect": "vllm"}
    with pytest.warns(FutureWarning, match='sampler: backend = "fireworks" with dialect = "vllm" is deprecated'):
        with pytest.raises(ConfigError, match=r"returns raw logprobs only.*@ sampling"):
            parse_config({**base, "sampler": {"backend": "fireworks", **old}, "sampling": {"temperature": 0.7}},
                         manager)
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "sampler": {"backend": "vllm", **old, "dialect": "fireworks"}}, manager)
    assert err.value.problems == [
        "backend 'vllm' speaks the vllm dialect, got dialect = 'fireworks'; use backend = \"fireworks\" for a "
        "Fireworks server @ sampler.dialect"]


def _server_run(tmp_path, tiny_models, base, *, steps, learning_rate, **sections):
    """A run config of the tiny models sampling on the server at ``base``, 12 prompts, 3 per step."""
    from tests.conftest import write_jsonl

    write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": f"{a}+{a}?"}]} for a in range(12)])
    return {
        "output_dir": str(tmp_path / "out"), "student": {"model": str(tiny_models["student"])},
        "teachers": [{"backend": "hf", "model": str(tiny_models["teacher"])}],
        "sampler": {"backend": "fireworks", "base_url": base, "model": "tiny"},
        "data": {"train": str(tmp_path / "train.jsonl")}, "sampling": {"max_new_tokens": 6},
        "train": {"steps": steps, "prompt_groups_per_step": 3, "completions_per_prompt": 2,
                  "learning_rate": learning_rate},
        **sections,
    }


def test_a_run_sampling_on_the_server_syncs_every_step_and_resumes_onto_the_server(tiny_models, tmp_path, manager):
    proc, base = _serve(tiny_models["student"], weights_root=tmp_path.parent)
    try:
        config = _server_run(tmp_path, tiny_models, base, steps=4, learning_rate=1e-2, checkpoint={"every_steps": 2})
        summary = run(parse_config(config, manager, source=str(tmp_path / "run.toml")), manager, progress=False)
        assert summary["sampler"]["syncs"] == 5 and summary["sampler"]["sync_max_gap"] < 1e-4
        assert summary["tokens"] > 0 and summary["time_s"]["weight_sync"] > 0
        # the server drifts back to the base weights; a resumed run must first put the trained ones back
        httpx.post(f"{base}/distill/v1/load_weights", json={"path": str(tiny_models["student"])}).raise_for_status()
        config["train"]["steps"] = 6  # extending a finished run changes its schedule: resumed anyway
        summary = run(parse_config(config, manager, source=str(tmp_path / "run.toml")), manager, resume="anyway",
                      progress=False)
        assert summary["resumed_from_step"] == 4
        assert summary["sampler"]["syncs"] == 5 + 3 and summary["sampler"]["sync_max_gap"] < 1e-4  # the whole run
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_cli_run_sampling_on_the_server_never_leaks_the_key(student_server, tiny_models, tmp_path):
    import os
    import subprocess
    import sys

    from ..e2e.test_run import _write_config

    path = _write_config(tmp_path, tiny_models, steps=2)
    secret = "sk-test-sampler-0123456789"
    sampler = f"sampler={{backend = 'fireworks', base_url = '{student_server}', model = 'tiny', api_key_env = 'MY_KEY'}}"
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(path), "--no-progress", "--set",
                           f"output_dir='{tmp_path / 'out'}'", "--set", sampler],
                          env={**os.environ, "MY_KEY": secret}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sampler"]["syncs"] == 3 and summary["sampler"]["sync_max_gap"] < 1e-4
    assert secret not in proc.stdout + proc.stderr
    files = [f for f in (tmp_path / "out").rglob("*") if f.is_file()]
    assert any(f.parent.name == "sampler_weights" for f in files)
    for file in files:
        assert secret.encode() not in file.read_bytes(), file


def test_the_remote_sampler_keeps_the_contract(student_server, tiny_models, tmp_path):
    from distill.testing import check_sampler

    async def scenario():
        sampler = _sampler(student_server, AutoModelForCausalLM.from_pretrained(tiny_models["student"]), tmp_path)
        try:
            await check_sampler(sampler, params=SamplingParams(max_new_tokens=5, temperature=0.8, top_k=8, n=3))
        finally:
            await sampler.aclose()

    asyncio.run(scenario())


def test_without_sampling_logprob_the_raw_logprob_is_used_only_where_it_is_the_behaviour_policys(tiny_models, tmp_path):
    from distill.plugins.fireworks.sampler import NO_SAMPLING_LOGPROB

    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    proc, base = _serve(tiny_models["student"], faults=("--omit", "sampling_logprob", "--omit", "usage",
                                                        "--first", "finish_error=1"))
    try:
        sampler = _sampler(base, student, tmp_path)
        rollouts = asyncio.run(sampler.sample(ROWS, SamplingParams(max_new_tokens=6, n=2), seeds=range(4)))
        counters = sampler.counters()
        with pytest.raises(DistillError) as stopped:
            asyncio.run(_sampler(base, student, tmp_path).sample(ROWS, SamplingParams(max_new_tokens=6, temperature=0.7),
                                                                 seeds=range(4)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert str(stopped.value) == NO_SAMPLING_LOGPROB
    assert counters["failed_attempts"] == {"invalid:finish_error": 1}
    for rollout in rollouts:  # at temperature 1 with no filters, the raw logprob is exact
        raw, _ = _local(student, rollout.prompt_ids, rollout.completion_ids_C.tolist())
        torch.testing.assert_close(rollout.sampling_logprobs_C, raw, atol=1e-4, rtol=0)
        assert rollout.sampling_logprobs_C.tolist() == rollout.model_logprobs_C.tolist()


def test_streamed_sampling_gives_the_same_samples_and_a_cut_stream_is_retried(student_server, tiny_models, tmp_path):
    from distill.plugins.fireworks.client import streamed_body

    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    params = SamplingParams(max_new_tokens=6, temperature=0.7, n=2)

    async def scenario(stream):
        sampler = _sampler(student_server, student, tmp_path, stream=stream)
        try:
            return await sampler.sample(ROWS, params, seeds=range(4, 8)), sampler.counters()
        finally:
            await sampler.aclose()

    (plain, _), (streamed, counters) = asyncio.run(scenario(False)), asyncio.run(scenario(True))
    assert counters["failed_attempts"] == {}
    for want, have in zip(plain, streamed, strict=True):
        assert have.completion_ids_C.tolist() == want.completion_ids_C.tolist()
        assert have.sampling_logprobs_C.tolist() == want.sampling_logprobs_C.tolist()
        assert have.model_logprobs_C.tolist() == want.model_logprobs_C.tolist()

    reply = httpx.post(f"{student_server}/inference/v1/completions",
                       json={"prompt": list(PROMPTS[0]), "max_tokens": 3, "logprobs": True, "stream": True})
    body = streamed_body(reply.text)
    assert parse_fireworks_samples(body, 1, 3)[0].ids == body["choices"][0]["raw_output"]["completion_token_ids"]
    for cut in (reply.text[: reply.text.index("data: [DONE]")], reply.text.replace('"finish_reason": "length"', '"finish_reason": null').replace('"finish_reason": "stop"', '"finish_reason": null')):
        with pytest.raises(Invalid, match="truncated_stream"):
            streamed_body(cut)


def test_stream_needs_the_fireworks_dialect(manager, tiny_models, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"}]}) + "\n")
    config = {"student": {"model": str(tiny_models["student"])}, "data": {"train": "train.jsonl"},
              "teachers": [{"backend": "hf", "model": str(tiny_models["teacher"])}],
              "sampler": {"backend": "vllm", "base_url": "http://127.0.0.1:1", "model": "s", "stream": True}}
    with pytest.raises(ConfigError, match=r"stream = true needs the fireworks dialect .* @ sampler\.stream"):
        parse_config(config, manager, source=str(tmp_path / "run.toml"))


def test_sampling_beyond_the_fireworks_apis_caps_is_a_config_error(manager, tiny_models, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"}]}) + "\n")
    config = {"student": {"model": str(tiny_models["student"])}, "data": {"train": "train.jsonl"},
              "teachers": [{"backend": "hf", "model": str(tiny_models["teacher"])}],
              "sampler": {"backend": "fireworks", "base_url": "http://127.0.0.1:1", "model": "s"},
              "sampling": {"temperature": 2.5, "top_k": 101}, "train": {"completions_per_prompt": 129}}
    with pytest.raises(ConfigError) as err:
        parse_config(config, manager, source=str(tmp_path / "run.toml"))
    assert [p for p in err.value.problems if "Fireworks" in p] == [
        "2.5 exceeds the Fireworks API's cap of 2 @ sampling.temperature",
        "101 exceeds the Fireworks API's cap of 100 @ sampling.top_k",
        "129 exceeds the Fireworks API's cap of 128 @ train.completions_per_prompt"]


def _lora_student(path, seed=0, **lora):
    """A PEFT LoRA model on ``path`` whose adapter is not the identity (peft starts B at zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora))
    _train_adapter(model)
    return model


def _train_adapter(model):
    with torch.no_grad():  # as a training step would: the adapter alone moves
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))


@pytest.mark.lora
@pytest.mark.parametrize("lora", [{}, {"use_dora": True}, {"modules_to_save": ["lm_head"]}],
                         ids=["lora", "dora", "modules_to_save"])
def test_a_peft_student_is_served_merged_as_the_final_export_and_the_trainer_keeps_its_weights(tiny_models, lora):
    pytest.importorskip("peft", reason="peft is an optional extra: pip install -e '.[lora]'")
    import copy

    from distill.plugins.fireworks.sampler import served_weights

    student = _lora_student(tiny_models["student"], **lora)
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    served = dict(served_weights(student))
    merged = copy.deepcopy(student).merge_and_unload().state_dict()
    plain = AutoModelForCausalLM.from_pretrained(tiny_models["student"]).state_dict()
    assert list(served) == list(plain)  # the plain model's names, in its order
    assert all(torch.equal(served[name], merged[name]) for name in merged)  # bit for bit what final/ holds
    assert not all(torch.equal(served[name], plain[name]) for name in plain)  # the adapter is in
    after = student.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[name], before[name]) for name in before)


@pytest.mark.lora
def test_a_lora_student_syncs_merged_weights_to_distill_serve(student_server, tiny_models, tmp_path):
    pytest.importorskip("peft", reason="peft is an optional extra: pip install -e '.[lora]'")
    student = _lora_student(tiny_models["student"])

    async def scenario():
        sampler = _sampler(student_server, student, tmp_path)
        try:
            await sampler.sync_weights(0)
            _train_adapter(student)
            with pytest.raises(DistillError, match="not serving the trained weights"):
                await sampler._check_sync(1)  # the server still holds the step-0 merge
            before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
            await sampler.sync_weights(1)
            after = student.state_dict()
            assert all(torch.equal(after[name], before[name]) for name in before)  # a sync never moves the trainer
            return sampler.counters(), await sampler.complete(PROMPTS, max_new_tokens=4)
        finally:
            await sampler.aclose()

    counters, greedy = asyncio.run(scenario())
    assert counters["syncs"] == 2 and counters["sync_max_gap"] > 1e-2  # the stale check's gap
    for prompt, ids in zip(PROMPTS, greedy, strict=True):  # the server now answers as the PEFT model
        with torch.no_grad():
            assert ids[0] == int(student(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())


@pytest.mark.lora
def test_a_lora_run_sampling_on_distill_serve_syncs_every_step(tiny_models, tmp_path, manager):
    pytest.importorskip("peft", reason="peft is an optional extra: pip install -e '.[lora]'")
    proc, base = _serve(tiny_models["student"], weights_root=tmp_path.parent)
    try:
        config = _server_run(tmp_path, tiny_models, base, steps=3, learning_rate=5e-2, trainer={"lora": {"rank": 4}})
        config["sampler"]["sync_tolerance"] = 1e-4
        summary = run(parse_config(config, manager, source=str(tmp_path / "run.toml")), manager, progress=False)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # every sync's probe matched: the server answered the merged model's logprobs after each step
    assert summary["sampler"]["syncs"] == 4 and summary["sampler"]["sync_max_gap"] < 1e-4
    assert summary["tokens"] > 0


@pytest.mark.lora
def test_adapter_sync_to_a_server_without_runtime_lora_loading_says_how_to_enable_it(student_server, tiny_models,
                                                                                      tmp_path):
    pytest.importorskip("peft", reason="peft is an optional extra: pip install -e '.[lora]'")
    sampler = _sampler(student_server, _lora_student(tiny_models["student"]), tmp_path, dialect="vllm",
                       sync="vllm-lora")  # distill-serve has no /v1/load_lora_adapter
    with pytest.raises(DistillError, match=r"Weight sync to 'tiny-lora' failed: /v1/load_lora_adapter answered 404: "
                                           r".*; start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        asyncio.run(sampler.sync_weights(0))


def test_adapter_sync_needs_vllm_and_a_lora_trainer(manager, tiny_models, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"}]}) + "\n")
    config = {"student": {"model": str(tiny_models["student"])}, "data": {"train": "train.jsonl"},
              "teachers": [{"backend": "hf", "model": str(tiny_models["teacher"])}],
              "sampler": {"backend": "fireworks", "base_url": "http://127.0.0.1:1", "model": "s", "sync": "vllm-lora"}}
    with pytest.raises(ConfigError) as err:
        parse_config(config, manager, source=str(tmp_path / "run.toml"))
    assert [p for p in err.value.problems if "vllm-lora" in p] == [
        "sync = 'vllm-lora' loads the adapter through vLLM's /v1/load_lora_adapter: use backend = \"vllm\" "
        "@ sampler.sync",
        "sync = 'vllm-lora' syncs the student's LoRA adapter, but the trainer trains none: add [trainer.lora], "
        "or sync merged weights with sync = 'vllm' @ sampler.sync"]
    # a trainer the config cannot tell about is caught once its student is built
    with pytest.raises(ConfigError, match=r"the student is no PEFT model.* @ sampler\.sync"):
        _sampler("http://127.0.0.1:1", AutoModelForCausalLM.from_pretrained(tiny_models["student"]), tmp_path,
                 dialect="vllm", sync="vllm-lora")
