"""``distill-serve`` speaks the Fireworks completions API: the fields, echo, streaming and checks
the API specifies, each asserted on a real server on 127.0.0.1. With ``DISTILL_FIREWORKS_PYTHON``
(a venv with ``fireworks-ai``; .ci/run makes it) every body seen here is also validated strictly
against the SDK's own response models."""

import json
import os
import subprocess

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.plugins.fireworks.client import streamed_body

from .test_fireworks import _serve

PROMPT = [2, 30, 31, 5, 3]
SEEN = {"json": [], "chunks": []}  # every body the tests received, for the SDK's validation


@pytest.fixture(scope="module")
def server(tiny_models):
    proc, base = _serve(tiny_models["teacher"], "--served-name", "tiny")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def _post(base, **body):
    reply = httpx.post(f"{base}/inference/v1/completions", json={"model": "tiny", **body}, timeout=60)
    assert reply.status_code == 200, reply.text
    if body.get("stream"):
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        SEEN["chunks"] += [json.loads(e) for e in events[:-1]]
        return streamed_body(reply.text), [json.loads(e) for e in events[:-1]]
    SEEN["json"].append(reply.json())
    return reply.json()


@torch.no_grad()
def _logprobs(model_dir, ids):
    logits = AutoModelForCausalLM.from_pretrained(model_dir)(torch.tensor([ids])).logits[0, :-1]
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def test_a_sample_has_every_field_the_api_specifies(server, tiny_models):
    body = _post(server, prompt=PROMPT, max_tokens=4, temperature=0.7, n=2, seed=3, logprobs=True, raw_output=True)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "text_completion" and body["model"] == "tiny" and isinstance(body["created"], int)
    completion_tokens = 0
    for index, choice in enumerate(body["choices"]):
        ids = choice["raw_output"]["completion_token_ids"]
        completion_tokens += len(ids)
        assert choice["index"] == index and choice["finish_reason"] in ("stop", "length")
        assert choice["raw_output"] == {"prompt_fragments": PROMPT, "prompt_token_ids": PROMPT,
                                        "completion": choice["text"], "completion_token_ids": ids}
        content = choice["logprobs"]["content"]
        assert [e["token_id"] for e in content] == ids
        assert "".join(e["token"] for e in content) == choice["text"]
        for entry in content:
            assert set(entry) == {"token", "bytes", "logprob", "sampling_logprob", "text_offset", "token_id",
                                  "top_logprobs"}
            assert entry["bytes"] == list(entry["token"].encode())
        offsets = [e["text_offset"] for e in content]
        assert offsets[0] == len("".join(e["token"] for e in _post(server, prompt=PROMPT, max_tokens=0, echo=True,
                                                                   logprobs=True)["choices"][0]["logprobs"]["content"]))
        assert offsets == [offsets[0] + len("".join(e["token"] for e in content[:i])) for i in range(len(content))]
        torch.testing.assert_close(torch.tensor([e["logprob"] for e in content]),
                                   _logprobs(tiny_models["teacher"], PROMPT + ids)[len(PROMPT) - 1:], atol=1e-4, rtol=0)
    assert body["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": completion_tokens,
                             "total_tokens": len(PROMPT) + completion_tokens}


def test_echo_puts_the_scored_prompt_first_then_real_samples(server, tiny_models):
    body = _post(server, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=True, top_logprobs=2,
                 raw_output=True)
    (choice,) = body["choices"]
    ids = choice["raw_output"]["completion_token_ids"]
    assert ids[:len(PROMPT)] == PROMPT and len(ids) == len(PROMPT) + 3  # the echoed prompt, then the completion
    content = choice["logprobs"]["content"]
    assert [e["token_id"] for e in content] == ids
    assert content[0]["logprob"] == 0.0 and content[0]["top_logprobs"] == [
        {"token": content[0]["token"], "bytes": content[0]["bytes"], "logprob": 0.0, "token_id": PROMPT[0]}]
    torch.testing.assert_close(torch.tensor([e["logprob"] for e in content[1:]]),
                               _logprobs(tiny_models["teacher"], ids), atol=1e-4, rtol=0)
    assert all(len(e["top_logprobs"]) == 2 for e in content[1:])
    assert all("sampling_logprob" not in e for e in content[:len(PROMPT)])
    assert all("sampling_logprob" in e for e in content[len(PROMPT):])
    greedy = _post(server, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=True, raw_output=True)
    assert ids[len(PROMPT):] == greedy["choices"][0]["raw_output"]["completion_token_ids"]

    last = _post(server, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, echo_last=2, logprobs=True)
    (choice,) = last["choices"]
    assert [e["token_id"] for e in choice["logprobs"]["content"]] == ids[len(PROMPT) - 2:]
    assert choice["logprobs"]["content"][0]["logprob"] == pytest.approx(content[len(PROMPT) - 2]["logprob"])


def test_a_string_prompt_max_completion_tokens_and_legacy_logprobs(server, tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    text = "12+34="
    by_text = _post(server, prompt=text, max_completion_tokens=3, temperature=0, logprobs=True)
    by_ids = _post(server, prompt=tokenizer.encode(text), max_tokens=3, temperature=0, logprobs=True)
    assert by_text["choices"][0]["raw_output"]["prompt_fragments"] == [text]
    assert by_text["choices"][0]["raw_output"]["completion_token_ids"] == by_ids["choices"][0]["raw_output"]["completion_token_ids"]
    assert len(by_ids["choices"][0]["raw_output"]["completion_token_ids"]) <= 3

    legacy = _post(server, prompt=PROMPT, max_tokens=2, temperature=0, logprobs=3)
    (choice,) = legacy["choices"]
    content = _post(server, prompt=PROMPT, max_tokens=2, temperature=0, logprobs=True,
                    top_logprobs=3)["choices"][0]["logprobs"]["content"]
    assert choice["logprobs"] == {
        "tokens": [e["token"] for e in content], "token_ids": [e["token_id"] for e in content],
        "token_logprobs": [e["logprob"] for e in content], "text_offset": [e["text_offset"] for e in content],
        "top_logprobs": [{c["token"]: c["logprob"] for c in e["top_logprobs"]} for e in content]}
    assert "logprobs" not in _post(server, prompt=PROMPT, max_tokens=2)["choices"][0]
    plain_echo = _post(server, prompt=PROMPT, max_tokens=2, temperature=0, echo=True)["choices"][0]
    assert "logprobs" not in plain_echo
    assert plain_echo["text"] == tokenizer.decode(PROMPT) + plain_echo["raw_output"]["completion"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", 2.5, "temperature must be a number in [0, 2], got 2.5"),
    ("top_k", 101, "top_k must be an integer in [0, 100], got 101"),
    ("n", 129, "n must be an integer in [1, 128], got 129"),
    ("n", 0, "n must be an integer in [1, 128], got 0"),
    ("top_logprobs", 6, "top_logprobs must be an integer in [0, 5], got 6"),
    ("logprobs", 6, "logprobs must be an integer in [0, 5], got 6"),
    ("max_tokens", 0, "max_tokens must be an integer in [1, inf], got 0"),
    ("top_p", 0, "top_p must be a number in (0, 1], got 0"),
])
def test_out_of_range_fields_are_a_400_naming_the_field(server, field, value, message):
    reply = httpx.post(f"{server}/inference/v1/completions", json={"prompt": PROMPT, field: value})
    assert (reply.status_code, reply.json()["error"]["message"]) == (400, message)


def test_streaming_sends_the_same_completion_as_events(server):
    request = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0.7, "n": 2, "seed": 5, "logprobs": True,
               "top_logprobs": 2, "echo": True, "raw_output": True}
    plain = _post(server, **request)
    assembled, chunks = _post(server, **request, stream=True)
    assert [c["choices"][0]["finish_reason"] is not None for c in chunks].count(True) == 2
    assert "usage" in chunks[-1] and all("usage" not in c for c in chunks[:-1])
    assert {c["id"] for c in chunks} == {assembled["id"]}
    assert assembled["usage"] == plain["usage"]
    for want, have in zip(plain["choices"], assembled["choices"], strict=True):
        assert have == want  # seeded: the same samples, entry by entry


def test_an_api_key_is_required_when_set_and_never_printed(tiny_models):
    from .test_fireworks import REQUESTS, _remote

    secret = "sk-serve-0123456789"
    proc, base = _serve(tiny_models["teacher"], "--api-key-env", "SERVE_KEY", env={"SERVE_KEY": secret})
    try:
        url = f"{base}/inference/v1/completions"
        body = {"prompt": PROMPT, "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": secret}):
            reply = httpx.post(url, json=body, headers=headers)
            assert (reply.status_code, reply.json()["error"]["message"]) == (
                401, "missing or wrong API key: send Authorization: Bearer <key>")
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/health").status_code == 200  # liveness probes need no key
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {secret}"}).status_code == 200
        os.environ["CLIENT_KEY"] = secret
        try:
            import asyncio

            scores = asyncio.run(_remote(base, api_key_env="CLIENT_KEY").score(REQUESTS[:1], top_k=2))
        finally:
            del os.environ["CLIENT_KEY"]
        assert scores[0].logprobs_C.numel() == len(REQUESTS[0].completion_ids)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert secret not in out + err


def test_a_non_loopback_address_needs_a_key_or_insecure(tiny_models):
    import sys

    proc = subprocess.run([sys.executable, "-m", "distill.plugins.serve", "--model", str(tiny_models["teacher"]),
                           "--host", "0.0.0.0", "--port", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("distill-serve: refusing to serve 0.0.0.0 without an API key: anyone who reaches "
                                   "the port could use it. Pass --api-key-env NAME, or --insecure on a trusted network")


def test_weights_load_only_with_a_root_and_only_from_inside_it(tiny_models, tmp_path, server):
    reply = httpx.post(f"{server}/distill/v1/load_weights", json={"path": str(tiny_models["teacher"])})
    assert (reply.status_code, reply.json()["error"]["message"]) == (
        403, "weight loading is off: start distill-serve with --weights-root DIR")
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    (root / "link").symlink_to(tiny_models["teacher"])  # a link that leaves the root
    proc, base = _serve(tiny_models["teacher"], weights_root=root)
    try:
        for path in (str(tiny_models["teacher"]), "../" + tiny_models["teacher"].name, str(root / "inside" / ".." / ".."),
                     "link"):
            reply = httpx.post(f"{base}/distill/v1/load_weights", json={"path": path})
            assert (reply.status_code, reply.json()["error"]["message"]) == (
                403, "the folder is outside the server's --weights-root"), path
        reply = httpx.post(f"{base}/distill/v1/load_weights", json={"path": "inside"})
        assert (reply.status_code, reply.json()["error"]["message"]) == (
            422, "cannot load weights from inside: the folder has no *.safetensors file")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_body_size_context_and_queue_limits(tiny_models):
    import asyncio

    proc, base = _serve(tiny_models["teacher"], "--max-body-bytes", "2000", "--max-queue", "1")
    url = f"{base}/inference/v1/completions"
    try:
        reply = httpx.post(url, json={"prompt": [3] * 1000})
        assert (reply.status_code, reply.json()["error"]["message"]) == (413, "the body is larger than 2000 bytes")
        reply = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 124})
        assert (reply.status_code, reply.json()["error"]["message"]) == (
            400, "prompt (5 tokens) plus max_tokens (124) exceeds the model's context of 128 tokens")

        async def two_at_once():
            arrived = asyncio.Event()

            async def slow_body():  # a request still arriving holds its place in the queue
                yield b'{"prompt": '
                await arrived.wait()
                yield json.dumps(PROMPT).encode() + b"}"

            async with httpx.AsyncClient(timeout=60) as client:
                first = asyncio.ensure_future(client.post(url, content=slow_body()))
                await asyncio.sleep(0.5)
                refused = await client.post(url, json={"prompt": PROMPT})
                arrived.set()
                return refused, await first

        refused, served = asyncio.run(two_at_once())
        assert (served.status_code, refused.status_code, refused.headers["retry-after"]) == (200, 429, "1")
        assert refused.json()["error"]["message"] == "1 requests are queued; retry later"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(not os.environ.get("DISTILL_FIREWORKS_PYTHON"),
                    reason="set DISTILL_FIREWORKS_PYTHON to a python with fireworks-ai (see .ci/run)")
@pytest.mark.fireworks
def test_every_body_validates_strictly_against_the_sdks_models(server):
    """Every JSON body and streamed chunk this module received (all of it when the module runs
    whole), and one of each kind of request in any case (``-m fireworks`` runs this test alone)."""
    for stream in (False, True):
        _post(server, prompt=PROMPT, max_tokens=3, n=2, logprobs=True, top_logprobs=2, stream=stream)
        _post(server, prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=True, top_logprobs=5,
              stream=stream)
        _post(server, prompt=PROMPT, max_tokens=2, echo=True, echo_last=1, logprobs=3, stream=stream)
        _post(server, prompt="1+2=", max_completion_tokens=2, stream=stream)
    script = ("import json, sys\n"
              "from fireworks.types import CompletionCreateResponse\n"
              "from fireworks.types.completion_chunk import CompletionChunk\n"
              "seen = json.load(sys.stdin)\n"
              "for body in seen['json']: CompletionCreateResponse.model_validate(body, strict=True)\n"
              "for chunk in seen['chunks']: CompletionChunk.model_validate(chunk, strict=True)\n")
    proc = subprocess.run([os.environ["DISTILL_FIREWORKS_PYTHON"], "-c", script], input=json.dumps(SEEN),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
