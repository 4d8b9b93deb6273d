"""The remote teacher against a real server on 127.0.0.1 (distill-serve), and its response checks."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill import hookimpl
from distill.config import load_config, parse_config
from distill.errors import ConfigError, DistillError
from distill.loop import run
from distill.plugins.fireworks import RemoteTeacherOptions
from distill.plugins.fireworks.client import Invalid
from distill.plugins.fireworks.teacher import RemoteTeacher, parse_fireworks_echo, parse_vllm_prompt_logprobs
from distill.plugins.hf.teacher import HFTeacher
from distill.testing import check_same_scores
from distill.types import BuildContext, ScoreFailure, ScoreRequest

from ..conftest import write_jsonl

REQUESTS = [ScoreRequest(prompt_ids=(2, 30, 31, 5, 3), completion_ids=(20, 21, 22, 1)),
            ScoreRequest(prompt_ids=(2, 33, 5, 3), completion_ids=(40, 1)),
            ScoreRequest(prompt_ids=(4, 40, 41, 42, 43, 5, 2, 33, 5, 3), completion_ids=(25, 26, 27))]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[2]


def _serve(model, *extra, faults=(), weights_root=None, env=None):
    """distill-serve on 127.0.0.1; ``faults`` (options of ``faulty_serve``) put the test-only fault
    injector in front of it; ``weights_root`` allows weight loading from folders inside it."""
    port = _free_port()
    command = ["tests.plugins.faulty_serve", *faults] if faults else ["distill.plugins.serve"]
    if weights_root is not None:
        extra = ("--weights-root", str(weights_root), *extra)
    proc = subprocess.Popen([sys.executable, "-m", *command, "--model", str(model), "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("distill-serve did not become healthy")


@pytest.fixture(scope="module")
def server(tiny_models):
    proc, base = _serve(tiny_models["teacher"])
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def _remote(base, **options):
    opts = RemoteTeacherOptions(base_url=base, model="tiny", backoff_base_s=0.01, **options)
    return RemoteTeacher.build(opts, BuildContext(run_config=None, output_dir=".", seed=0, device="cpu"))


def test_models_and_health_endpoints(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server}/v1/models").json()["data"][0]["object"] == "model"


@pytest.mark.parametrize("stream", [False, True])
def test_remote_scores_match_the_local_teacher(server, tiny_models, stream):
    local = HFTeacher(AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]), None, batch_size=8)
    teacher = _remote(server, stream=stream)
    asyncio.run(check_same_scores(teacher, local, top_k=5, requests=REQUESTS))
    assert teacher.counters()["failed_attempts"] == {}


def test_a_refused_request_fails_fast_with_the_servers_message(server):
    with pytest.raises(DistillError, match=r"refused a request: /inference/v1/completions answered 400: top_logprobs must be an integer in \[0, 5\], got 6"):
        asyncio.run(_remote(server).score(REQUESTS[:1], top_k=6))


def test_injected_faults_are_retried_and_counted_exactly(tiny_models):
    proc, base = _serve(tiny_models["teacher"], faults=("--faults", "429=0.1,500=0.1,reset=0.05,stall=0.05,truncate=0.1,corrupt=0.1",
                                                              "--fault-seed", "3", "--stall-s", "6"))
    try:
        teacher = _remote(base, timeout_s=3, max_attempts=8)  # a loaded machine must not time out
        requests = REQUESTS * 10
        results = asyncio.run(teacher.score(requests, top_k=3))
        injected = httpx.get(f"{base}/faults").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert sum(injected.values()) > 10
    counts = teacher.counters()["failed_attempts"]
    by_kind = {"429": counts.get("http_429", 0), "500": counts.get("http_500", 0), "stall": counts.get("timeout", 0),
               "truncate": counts.get("bad_json", 0), "corrupt": counts.get("invalid:non_finite_logprob", 0),
               "reset": sum(v for k, v in counts.items() if k.startswith("transport:"))}
    assert by_kind == {kind: injected.get(kind, 0) for kind in by_kind}
    expected = [s for s in asyncio.run(HFTeacher(AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]), None, 8).score(requests, top_k=3))]
    for want, have in zip(expected, results, strict=True):
        if isinstance(have, ScoreFailure):
            continue  # a request that failed every attempt is dropped, never misaligned
        torch.testing.assert_close(have.logprobs_C, want.logprobs_C, atol=1e-4, rtol=0)


def test_a_teacher_that_stays_down_stops_with_a_clear_message():
    teacher = _remote(f"http://127.0.0.1:{_free_port()}", max_attempts=2, max_failures_in_a_row=3)
    with pytest.raises(DistillError, match=r"failed 3 requests in a row .*The last checkpoint is intact"):
        asyncio.run(teacher.score(REQUESTS * 2, top_k=0))


SEQ = [2, 7, 8, 9]


def _content(ids, logprob=-0.5, top=()):
    return [{"token_id": i, "logprob": None if n == 0 else logprob, "top_logprobs": list(top)} for n, i in enumerate(ids)]


def _echo(content, finish="length"):
    return {"choices": [{"index": 0, "finish_reason": finish, "logprobs": {"content": content}}]}


@pytest.mark.parametrize(("body", "reason"), [
    (_echo(_content([2, 7, 8])), "short_echo"),
    (_echo(_content([2, 7, 5, 9, 1])), "echo_mismatch"),
    (_echo(_content(SEQ + [1], logprob=None)), "non_finite_logprob"),
    (_echo(_content(SEQ + [1], top=[{"token_id": 3, "logprob": -1.0}])), "missing_top_k"),
    (_echo(_content(SEQ + [1], top=[{"token_id": 3, "logprob": -1.0}, {"token": "x", "logprob": -2.0}])), "missing_top_k"),
    (_echo(_content(SEQ + [1]), finish="error"), "finish_error"),
    ({"choices": []}, "missing_choices"),
    ({"choices": [{"index": 0}]}, "malformed"),
])
def test_fireworks_responses_that_do_not_line_up_are_rejected(body, reason):
    with pytest.raises(Invalid) as bad:
        parse_fireworks_echo(body, SEQ, prompt_len=2, top_k=2)
    assert bad.value.reason == reason


def test_fireworks_echo_alignment_and_candidates():
    content = _content(SEQ + [1], top=[{"token_id": 3, "logprob": -2.0}, {"token_id": 4, "logprob": -1.0}])
    content[2]["logprob"], content[3]["logprob"] = -0.25, -0.75
    scores = parse_fireworks_echo(_echo(content), SEQ, prompt_len=2, top_k=2)
    assert scores.logprobs_C.tolist() == [-0.25, -0.75]  # targets of 8 and 9; the generated 1 is dropped
    assert scores.topk_ids_C_K.tolist() == [[4, 3], [4, 3]]


def test_vllm_prompt_logprobs_are_keyed_by_token_id():
    positions = [None, {"7": {"logprob": -1.0, "rank": 2}},
                 {"8": {"logprob": -0.1, "rank": 1}, "5": {"logprob": -3.0, "rank": 2}},
                 {"9": {"logprob": -4.0, "rank": 7}, "6": {"logprob": -0.2, "rank": 1}, "3": {"logprob": -2.0, "rank": 2}}]
    scores = parse_vllm_prompt_logprobs({"prompt_logprobs": positions}, SEQ, prompt_len=2, top_k=2)
    assert scores.logprobs_C.tolist() == pytest.approx([-0.1, -4.0])
    assert scores.topk_ids_C_K.tolist() == [[8, 5], [6, 3]]
    with pytest.raises(Invalid, match="echo_mismatch"):  # the scored token is missing at its position
        parse_vllm_prompt_logprobs({"prompt_logprobs": positions}, [2, 7, 4, 9], prompt_len=2, top_k=2)
    with pytest.raises(Invalid, match="echo_mismatch"):  # the server echoed other prompt ids
        parse_vllm_prompt_logprobs({"prompt_logprobs": positions, "prompt_token_ids": [2, 7, 5, 9]}, SEQ, 2, 2)
    with pytest.raises(Invalid, match="length_mismatch"):
        parse_vllm_prompt_logprobs({"prompt_logprobs": positions[:3]}, SEQ, prompt_len=2, top_k=2)


def test_top_k_above_the_dialect_cap_is_a_config_error(manager):
    raw = {"student": {"model": "s"}, "data": {"train": "t"}, "loss": {"name": "topk_forward_kl", "top_k": 8},
           "teachers": [{"backend": "fireworks", "base_url": "http://x", "model": "m"}]}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == ["top_k 8 exceeds the Fireworks API's cap of 5 top_logprobs for teacher 'm' (teachers[0]) @ loss.top_k"]


def test_a_streaming_teacher_needs_the_fireworks_dialect(manager):
    raw = {"student": {"model": "s"}, "data": {"train": "t"},
           "teachers": [{"backend": "vllm", "base_url": "http://x", "model": "m", "stream": True}]}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == ["stream = true needs the fireworks dialect (server-sent events in its format) "
                                  "@ teachers[0].stream"]


@pytest.mark.slow
def test_a_run_with_the_teacher_over_http_matches_the_local_run_and_never_leaks_the_key(server, tiny_models, tmp_path, manager):
    from ..e2e.test_run import _write_config

    path = _write_config(tmp_path, tiny_models, steps=2)
    secret = "sk-test-0123456789abcdef"
    local = load_config(path, manager, [f"output_dir='{tmp_path / 'local'}'", "data.eval=''"])
    env = {**os.environ, "MY_TEACHER_KEY": secret}
    remote_teacher = f"teachers.0={{backend = 'fireworks', base_url = '{server}', model = 'tiny', api_key_env = 'MY_TEACHER_KEY', tokenizer = '{tiny_models['tokenizer']}'}}"
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(path), "--no-progress",
                           "--set", f"output_dir='{tmp_path / 'remote'}'", "--set", "data.eval=''", "--set", remote_teacher],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    run(local, manager, progress=False)
    local_lines = [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    remote_lines = [json.loads(line) for line in (tmp_path / "remote" / "metrics.jsonl").read_text().splitlines()]
    for want, have in zip(local_lines, remote_lines, strict=True):
        assert have["teacher_logprob"] == pytest.approx(want["teacher_logprob"], abs=1e-4)
        assert have["completion_tokens"] == want["completion_tokens"]
    assert secret not in proc.stdout + proc.stderr
    for file in (tmp_path / "remote").rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file


def test_adaptive_window_bounds_concurrency_admits_in_order_and_adapts():
    from distill.plugins.fireworks.client import AdaptiveWindow

    async def scenario():
        window = AdaptiveWindow(initial=2, maximum=4)
        running, peak, order = 0, 0, []

        async def job(i):
            nonlocal running, peak
            async with window:
                order.append(i)
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0.01)
                running -= 1

        await asyncio.gather(*(job(i) for i in range(3)))
        assert peak == 1  # until a first success, requests go alone: the latency floor is measured unloaded
        window.success(0.01)
        await asyncio.gather(*(job(i) for i in range(3, 13)))
        assert peak == 2 and order == list(range(13)) and window.in_flight == 0
        window = AdaptiveWindow(initial=2, maximum=4)
        window.overload()
        assert window.limit == 1.0
        for _ in range(3):
            window.success(0.01)
        assert window.limit == pytest.approx(2.9)  # 1 -> 2 -> 2.5 -> 2.9: about +1 per window of successes

        # a waiter cancelled while queued gives up its place; the slot goes to the next in line
        window = AdaptiveWindow(initial=1, maximum=1)
        window.success(0.01)
        await window.__aenter__()
        queued = asyncio.ensure_future(window.__aenter__())
        nxt = asyncio.ensure_future(window.__aenter__())
        await asyncio.sleep(0)
        queued.cancel()
        await window.__aexit__()
        await asyncio.sleep(0)
        assert nxt.done() and window.in_flight == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("capacity", [1, 4, 16])
def test_adaptive_window_takes_a_queueing_servers_throughput_short_of_timeouts(capacity):
    """A server that serves ``capacity`` requests at once and queues the rest (vLLM: no 429) answers
    in 10 ms up to its capacity and proportionally slower above it. Its throughput is the same at
    any window from its capacity up, so the window may climb towards the maximum, but halves when a
    reply takes over half the timeout: with a 0.16 s timeout it saws between 4 and 8·capacity."""
    from distill.plugins.fireworks.client import AdaptiveWindow

    def latency(window):
        return 0.01 * max(1.0, int(window.limit) / capacity)

    for initial in (1, 64):
        window = AdaptiveWindow(initial=initial, maximum=64, slow_s=0.08)
        window.success(0.01)  # the first request, alone
        limits = []
        for _ in range(3000):
            window.success(latency(window))
            limits.append(window.limit)
        settled = limits[-1000:]
        assert min(settled) >= capacity  # the server stays saturated: its full throughput
        assert max(settled) >= min(8 * capacity, 64) - 1, (initial, max(settled))
        assert 0.01 * max(settled) / capacity < 0.16  # and no reply comes near the timeout

    patient = AdaptiveWindow(initial=8, maximum=64, slow_s=0.08)
    patient.success(0.5)  # a long request, alone: slow, but not queueing
    for _ in range(3000):
        patient.success(0.5)
    assert patient.limit == 64


class _KilledAfterCheckpoint:
    """Stops the run right after the checkpoint of ``step`` is saved, as a SIGKILL there would."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def distill_on_checkpoint_saved(self, step):
        if step == self.step:
            raise RuntimeError("killed")


def _teacher_failures(counts):
    return sum(n for reason, n in counts.items() if reason.startswith("teacher_failed:"))


@pytest.mark.slow
def test_remote_counters_cover_the_whole_run_across_a_resume(tiny_models, tmp_path, manager):
    """Every fault both servers injected, over a run killed after its step-2 checkpoint and resumed, is
    in the final summary; teacher requests that failed for good are in ``rows_skipped`` (training)
    or ``eval_dropped`` (evaluation), never lost."""
    teacher_proc, teacher_base = _serve(tiny_models["teacher"], faults=("--faults", "429=0.1,500=0.1,reset=0.05,truncate=0.1,corrupt=0.05",
                                                                              "--fault-seed", "11"))
    student_proc, student_base = _serve(tiny_models["student"], weights_root=tmp_path.parent, faults=("--faults", "429=0.05,500=0.05,reset=0.02,truncate=0.05",
                                                                              "--fault-seed", "12"))
    try:
        rows = [{"messages": [{"role": "user", "content": f"{a}+{a}?"}], "expected_answer": str(2 * a)} for a in range(10)]
        write_jsonl(tmp_path / "train.jsonl", rows)
        write_jsonl(tmp_path / "eval.jsonl", rows[:8])
        remote = {"model": "tiny", "backoff_base_s": 0.01}
        config = parse_config({
            "output_dir": str(tmp_path / "out"), "student": {"model": str(tiny_models["student"])},
            "teachers": [{"backend": "fireworks", "base_url": teacher_base, "max_attempts": 1, **remote}],
            "sampler": {"backend": "fireworks", "base_url": student_base, "max_attempts": 10, **remote},
            "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
            "sampling": {"max_new_tokens": 4}, "eval": {"every_steps": 2},
            "train": {"steps": 4, "prompt_groups_per_step": 4, "completions_per_prompt": 2, "learning_rate": 1e-2},
            "checkpoint": {"every_steps": 2},
        }, manager, source=str(tmp_path / "run.toml"))
        manager.register(_KilledAfterCheckpoint(step=2), name="killer")
        with pytest.raises(RuntimeError, match="killed"):
            run(config, manager, progress=False)
        manager.unregister("killer")
        summary = run(config, manager, progress=False)
        teacher_faults = httpx.get(f"{teacher_base}/faults").json()
        student_faults = httpx.get(f"{student_base}/faults").json()
    finally:
        for proc in (teacher_proc, student_proc):
            proc.terminate()
            proc.wait(timeout=30)
    assert summary["resumed_from_step"] == 2
    (teacher,) = summary["teachers"].values()
    assert sum(teacher["failed_attempts"].values()) == sum(teacher_faults.values()) > 0
    assert teacher["dropped"] == teacher["failed_attempts"]  # one attempt each: every failure drops its request
    assert teacher["failed"] == _teacher_failures(summary["rows_skipped"]) > 0
    assert _teacher_failures(summary["eval_dropped"]) > 0
    assert sum(teacher["dropped"].values()) == _teacher_failures(summary["rows_skipped"]) + _teacher_failures(summary["eval_dropped"])
    assert sum(summary["sampler"]["failed_attempts"].values()) == sum(student_faults.values()) > 0
    assert summary["sampler"]["syncs"] == 4 + 2  # steps 1-4, and once as each of the two attempts starts


@pytest.mark.parametrize("top_k", [0, 5])
def test_the_remote_teacher_keeps_the_contract(server, top_k):
    from distill.testing import check_teacher

    async def scenario():
        teacher = _remote(server)
        try:
            await check_teacher(teacher, top_k=top_k)
        finally:
            await teacher.aclose()

    asyncio.run(scenario())


def _faulty_teacher_scores(tiny_models, faults, top_k=3, tokenizer=None, **options):
    """The remote teacher's scores of REQUESTS through the fault fixture, with its counters."""
    proc, base = _serve(tiny_models["teacher"], faults=faults)
    try:
        opts = RemoteTeacherOptions(base_url=base, model="tiny", backoff_base_s=0.01, **options)
        teacher = RemoteTeacher.build(opts, BuildContext(run_config=None, output_dir=".", seed=0, device="cpu",
                                                         tokenizer=tokenizer))
        started = time.monotonic()
        try:
            scores = asyncio.run(teacher.score(REQUESTS, top_k=top_k))
        finally:
            elapsed = time.monotonic() - started
        return scores, teacher.counters(), httpx.get(f"{base}/faults").json(), elapsed
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _local_scores(tiny_models, top_k=3):
    local = HFTeacher(AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]), None, batch_size=8)
    return asyncio.run(local.score(REQUESTS, top_k=top_k))


def _assert_same(have, want):
    for h, w in zip(have, want, strict=True):
        torch.testing.assert_close(h.logprobs_C, w.logprobs_C, atol=1e-4, rtol=0)
        torch.testing.assert_close(h.topk_logprobs_C_K, w.topk_logprobs_C_K, atol=1e-4, rtol=0)
        assert h.topk_ids_C_K.tolist() == w.topk_ids_C_K.tolist()


def test_not_ready_then_error_finish_then_a_dated_retry_after_are_retried_and_counted(tiny_models):
    faults = ("--first", "425=2", "--first", "404=1", "--first", "finish_error=2", "--first", "429_date=1")
    scores, counters, injected, elapsed = _faulty_teacher_scores(tiny_models, faults, max_attempts=4)
    assert injected == {"425": 2, "404": 1, "finish_error": 2, "429_date": 1}
    assert counters["failed_attempts"] == {"http_425": 2, "http_404": 1, "invalid:finish_error": 2, "http_429": 1}
    assert counters["dropped"] == {}  # not-ready polls use no attempts: 3 more failures fit in 4 attempts
    assert elapsed >= 1.0  # the date is 2 s ahead, to the second: the client waited for it
    _assert_same(scores, _local_scores(tiny_models))


def test_a_server_that_stays_not_ready_stops_the_run_naming_the_url_and_status(tiny_models):
    with pytest.raises(DistillError, match=r"refused a request: http://127\.0\.0\.1:\d+/inference/v1/completions "
                                           r"answered 425 \(not ready\) for 0\.5 s: the deployment is missing, "
                                           r"starting or loading weights\. Check base_url and model, or wait "
                                           r"longer with not_ready_wait_s"):
        _faulty_teacher_scores(tiny_models, ("--first", "425=10000"), not_ready_wait_s=0.5)


def test_candidates_without_token_id_resolve_by_id_or_by_their_text(tiny_models):
    from transformers import AutoTokenizer

    want = _local_scores(tiny_models)
    scores, counters, _, _ = _faulty_teacher_scores(tiny_models, ("--omit", "candidate_token_id_as_id"))
    _assert_same(scores, want)
    assert counters["unresolved_candidates"] == 0

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])  # character-level: each text is one id
    scores, counters, _, _ = _faulty_teacher_scores(tiny_models, ("--omit", "candidate_token_id"), tokenizer=tokenizer)
    _assert_same(scores, want)
    assert counters["unresolved_candidates"] == 0


def test_candidates_that_resolve_to_nothing_are_dropped_and_counted(tiny_models):
    scores, counters, _, _ = _faulty_teacher_scores(tiny_models, ("--omit", "candidate_token_id"), top_k=2,
                                                    max_attempts=1)  # no tokenizer: only ids resolve
    assert all(isinstance(s, ScoreFailure) and s.reason == "invalid:missing_top_k" for s in scores)
    assert counters["unresolved_candidates"] == 2 * len(REQUESTS)  # a reply is refused at its first short position
    assert counters["dropped"] == {"invalid:missing_top_k": len(REQUESTS)}


def test_retry_after_reads_seconds_and_http_dates():
    import email.utils

    from distill.plugins.fireworks.client import _retry_after

    def reply(value):
        return httpx.Response(429, headers={} if value is None else {"retry-after": value})

    assert _retry_after(reply("3")) == 3.0
    assert _retry_after(reply(None)) is None and _retry_after(reply("soon")) is None
    assert 8 < _retry_after(reply(email.utils.formatdate(time.time() + 10, usegmt=True))) <= 10
    assert _retry_after(reply(email.utils.formatdate(time.time() - 60, usegmt=True))) == 0.0


# One of each fault a streamed reply can carry: cut before ``data: [DONE]``, no choice finished, a
# chunk that is not JSON, cut mid-event, a choice finishing with "error", a null logprob, a dropped
# connection. Each is one failed attempt, retried and counted by its reason.
STREAM_FAULTS = ("stream_no_done", "stream_unfinished", "stream_bad_chunk", "truncate", "finish_error", "corrupt",
                 "reset")
STREAM_FAILURES = {"invalid:truncated_stream": 3, "bad_json": 1, "invalid:finish_error": 1,
                   "invalid:non_finite_logprob": 1, "transport:RemoteProtocolError": 1}


def _first(faults):
    return tuple(arg for fault in faults for arg in ("--first", f"{fault}=1"))


def test_a_plain_request_never_draws_a_stream_only_fault():
    from distill.plugins.serve.faults import FaultPlan

    plan = FaultPlan({"stream_no_done": 1.0}, seed=0, stall_s=0, first={"stream_unfinished": 1, "500": 1})
    assert [plan.draw(streamed=False), plan.draw(streamed=False), plan.draw(streamed=True),
            plan.draw(streamed=True)] == ["500", None, "stream_unfinished", "stream_no_done"]
    assert plan.injected == {"500": 1, "stream_unfinished": 1, "stream_no_done": 1}


def test_streamed_scores_are_validated_as_strictly_and_each_bad_stream_is_retried_and_counted(tiny_models):
    scores, counters, injected, _ = _faulty_teacher_scores(tiny_models, _first(STREAM_FAULTS), max_attempts=8,
                                                           stream=True)
    assert injected == dict.fromkeys(STREAM_FAULTS, 1)
    assert counters["failed_attempts"] == STREAM_FAILURES
    assert counters["dropped"] == {}
    _assert_same(scores, _local_scores(tiny_models))


def test_streamed_samples_are_validated_as_strictly_and_each_bad_stream_is_retried_and_counted(tiny_models, tmp_path):
    from distill.plugins.fireworks import RemoteSamplerOptions
    from distill.plugins.fireworks.sampler import RemoteSampler
    from distill.types import PromptRow, SamplingParams

    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    rows = [PromptRow(index=i, messages=(), prompt_ids=r.prompt_ids) for i, r in enumerate(REQUESTS)]
    params = SamplingParams(max_new_tokens=6, temperature=0.7, n=2)

    async def sample(base):
        options = RemoteSamplerOptions(base_url=base, model="tiny", backoff_base_s=0.01, max_attempts=8, stream=True)
        sampler = RemoteSampler.build(options, BuildContext(run_config=None, output_dir=tmp_path, seed=0,
                                                            device="cpu", student=student))
        try:
            return await sampler.sample(rows, params, seeds=[11, 12, 13]), sampler.counters()["failed_attempts"]
        finally:
            await sampler.aclose()

    proc, base = _serve(tiny_models["student"], faults=_first(STREAM_FAULTS))
    try:
        faulty, failed = asyncio.run(sample(base))
        clean, none_failed = asyncio.run(sample(base))  # the faults are used up: the same seeds again
        injected = httpx.get(f"{base}/faults").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert injected == dict.fromkeys(STREAM_FAULTS, 1)
    assert (failed, none_failed) == (STREAM_FAILURES, {})
    assert len(faulty) == len(rows) * params.n
    for have, want in zip(faulty, clean, strict=True):  # a retried request gives the sample it would have
        assert have.completion_ids_C.tolist() == want.completion_ids_C.tolist()
        assert have.sampling_logprobs_C.tolist() == want.sampling_logprobs_C.tolist()
        assert have.model_logprobs_C.tolist() == want.model_logprobs_C.tolist()
