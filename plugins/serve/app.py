"""The ``distill-serve`` application: a teacher (or the student) answering the Fireworks completions API.

``POST /inference/v1/completions`` answers as the API specifies, so that the ``fireworks-ai`` SDK
and our client both read it: a token-id or string prompt; ``n`` sampled completions (``max_tokens``
or ``max_completion_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``) with ``raw_output``;
with ``logprobs: true`` each token's ``logprob`` (raw model), ``sampling_logprob`` (after
temperature and filters, generated tokens only) and ``top_logprobs`` candidates; an integer
``logprobs`` gives the legacy arrays instead. ``echo`` puts the prompt's entries first, scored by
the teacher (``echo_last``: only its last N); the unconditional first token of a full echo gets
logprob 0.0 (it is given; the spec types the field as a float) and itself as its only candidate.
``stream: true`` sends the same as server-sent events. ``POST /distill/v1/load_weights {"path":
FOLDER}`` hot-loads new weights; ``GET /v1/models``, ``GET /health``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from distill import ScoreRequest, sample_seed
from distill.plugins.hf.generation import generate, special_ids

__all__ = ["Limits", "build_app"]

INF = float("inf")


def _request(body: Any, tokenizer: Any) -> dict[str, Any] | str:
    """The request's fields, checked against the API's ranges, or what is wrong (a 400 naming it)."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    prompt = body.get("prompt")
    if isinstance(prompt, str) and tokenizer is not None:
        prompt = tokenizer.encode(prompt)
    if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return "prompt must be a string (on a server with a tokenizer) or a non-empty list of token ids"
    if tokenizer is not None and any(not 0 <= t < len(tokenizer) for t in prompt):
        return f"token ids must be in [0, {len(tokenizer)})"
    logprobs = body.get("logprobs")
    legacy = isinstance(logprobs, int) and not isinstance(logprobs, bool)
    echo = bool(body.get("echo"))
    fields: dict[str, Any] = {"prompt": prompt, "stream": bool(body.get("stream")),
                              "fragments": [body["prompt"]] if isinstance(body["prompt"], str) else prompt,
                              "logprobs": "legacy" if legacy else "content" if logprobs else None}
    integers = {  # name: (value, least, most), the caps the Fireworks API sets
        "n": (body.get("n", 1), 1, 128), "top_k": (body.get("top_k", 0), 0, 100), "seed": (body.get("seed", 0), 0, INF),
        "logprobs" if legacy else "top_logprobs": (logprobs if legacy else body.get("top_logprobs") or 0, 0, 5),
        "echo_last": (body.get("echo_last", len(prompt) if echo else 0), 0, INF),
        "max_tokens": (body.get("max_tokens", body.get("max_completion_tokens", 16)), 0 if echo else 1, INF),
    }
    for name, (value, low, high) in integers.items():
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return f"{name} must be an integer in [{low}, {high:g}], got {value!r}"
        fields["top_logprobs" if name == "logprobs" else name] = value
    fields["echo_last"] = min(fields["echo_last"], len(prompt))
    for name, default, low, high in (("temperature", 1.0, 0.0, 2.0), ("top_p", 1.0, 0.0, 1.0)):
        value = body.get(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high or (
                name == "top_p" and value == 0):
            return f"{name} must be a number in {'(' if name == 'top_p' else '['}{low:g}, {high:g}], got {value!r}"
        fields[name] = float(value)
    return fields


def _text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def _entry(tokenizer: Any, token_id: int, logprob: float, offset: int, candidates: Sequence[tuple[int, float]],
           sampling_logprob: float | None = None) -> dict[str, Any]:
    """One ``logprobs.content`` entry as the API specifies it."""
    text = _text(tokenizer, token_id)
    entry = {"token": text, "bytes": list(text.encode()), "logprob": logprob, "text_offset": offset,
             "token_id": token_id,
             "top_logprobs": [{"token": _text(tokenizer, i), "bytes": list(_text(tokenizer, i).encode()),
                               "logprob": lp, "token_id": i} for i, lp in candidates]}
    if sampling_logprob is not None:
        entry["sampling_logprob"] = sampling_logprob
    return entry


def _generate(model: Any, request: dict[str, Any]) -> list[tuple[list[int], list[float], list[float], bool]]:
    """``n`` samples as (ids, raw logprobs, behaviour logprobs, ended with EOS), completion ``j``
    drawn from ``sample_seed(seed, j)``, as the local ``hf`` sampler draws a row's completions."""
    if request["max_tokens"] == 0:
        return [([], [], [], False)] * request["n"]
    eos, pad = special_ids(model)
    outputs = generate(model, [request["prompt"]] * request["n"], max_new_tokens=request["max_tokens"], eos_id=eos,
                       pad_id=pad, temperature=request["temperature"] or 1.0, top_k=request["top_k"],
                       top_p=request["top_p"], greedy=request["temperature"] == 0,
                       seeds=[sample_seed(request["seed"], j) for j in range(request["n"])])
    return [(out.ids_C.tolist(), out.model_logprobs_C.tolist(), out.sampling_logprobs_C.tolist(), out.finished)
            for out in outputs]


async def _completion(teacher: Any, model: Any, tokenizer: Any, request: dict[str, Any], name: str) -> dict[str, Any]:
    """The whole response body: sample, then have the teacher score what it must (echoed prompt
    entries, top-K candidates)."""
    prompt, top_k, echoed = request["prompt"], request["top_logprobs"], request["echo_last"]
    if model is not None:
        samples = await asyncio.to_thread(_generate, model, request)
    else:  # a scoring-only backend completes greedily; its logprobs come from scoring
        completions = (await teacher.complete([prompt] * request["n"], max_new_tokens=request["max_tokens"])
                       if request["max_tokens"] else [[]] * request["n"])
        samples = [(list(ids), [], [], False) for ids in completions]
    scored: list[Any] = [None] * len(samples)
    if (request["logprobs"] and (echoed or top_k)) or model is None:
        wanted = [i for i, (ids, *_) in enumerate(samples) if len(prompt) + len(ids) >= 2]
        scores = await teacher.score([ScoreRequest(prompt_ids=tuple(prompt[:1]),
                                                   completion_ids=tuple(prompt[1:] + samples[i][0])) for i in wanted],
                                     top_k=top_k)
        for i, score in zip(wanted, scores, strict=True):
            scored[i] = score
    prompt_text = "".join(_text(tokenizer, t) for t in prompt)
    choices = []
    for index, ((ids, raw, behaviour, finished), score) in enumerate(zip(samples, scored, strict=True)):
        sequence, first = prompt + ids, len(prompt) - echoed
        offset, entries = 0 if echoed else len(prompt_text), []
        for position in range(first, len(sequence)) if request["logprobs"] else ():
            token, generated = sequence[position], position - len(prompt)
            if position == 0:
                logprob, candidates = 0.0, [(token, 0.0)] if top_k else []
            elif score is not None:
                logprob = float(score.logprobs_C[position - 1])
                candidates = list(zip(score.topk_ids_C_K[position - 1].tolist(),
                                      score.topk_logprobs_C_K[position - 1].tolist(), strict=True)) if top_k else []
            else:
                logprob, candidates = raw[generated], []
            entries.append(_entry(tokenizer, token, logprob, offset, candidates,
                                  behaviour[generated] if generated >= 0 and behaviour else None))
            offset += len(entries[-1]["token"])
        completion = "".join(_text(tokenizer, t) for t in ids)
        echoed_text = "".join(_text(tokenizer, t) for t in prompt[first:])
        choice = {"index": index, "text": echoed_text + completion, "finish_reason": "stop" if finished else "length",
                  "raw_output": {"prompt_fragments": request["fragments"],
                                 "prompt_token_ids": prompt, "completion": completion,
                                 "completion_token_ids": sequence[first:]}}
        if request["logprobs"] == "legacy":
            choice["logprobs"] = {"tokens": [e["token"] for e in entries], "token_ids": [e["token_id"] for e in entries],
                                  "token_logprobs": [e["logprob"] for e in entries],
                                  "text_offset": [e["text_offset"] for e in entries],
                                  "top_logprobs": [{c["token"]: c["logprob"] for c in e["top_logprobs"]} for e in entries]}
        elif request["logprobs"]:
            choice["logprobs"] = {"content": entries}
        choices.append(choice)
    completion_tokens = sum(len(ids) for ids, *_ in samples)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": name,
            "choices": choices, "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                                          "total_tokens": len(prompt) + completion_tokens}}


async def _events(body: dict[str, Any]) -> AsyncIterator[bytes]:
    """The response as server-sent events in the Fireworks format: one chunk per token of each
    choice, then one per choice with its ``finish_reason`` and ``raw_output``, ``usage`` on the
    last, then ``data: [DONE]``."""
    head = {key: body[key] for key in ("id", "object", "created", "model")}
    chunks = []
    for choice in body["choices"]:
        for entry in choice.get("logprobs", {}).get("content") or ():
            chunks.append({"index": choice["index"], "text": entry["token"], "finish_reason": None,
                           "logprobs": {"content": [entry]}})
        last = {key: value for key, value in choice.items() if key != "logprobs"}
        if choice.get("logprobs") and "content" not in choice["logprobs"]:
            last["logprobs"] = choice["logprobs"]  # legacy arrays: sent whole, with the text
        elif choice.get("logprobs"):
            last["text"] = ""
        chunks.append(last)
    for number, choice in enumerate(chunks):
        chunk = {**head, "choices": [choice]}
        if number == len(chunks) - 1:
            chunk["usage"] = body["usage"]
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"


def _load_weights(model: Any, folder: Path) -> None:
    """Load every ``*.safetensors`` in ``folder`` into ``model`` in place, or change nothing: names
    and shapes are checked before any tensor is copied. A tied head may be absent."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError("the folder has no *.safetensors file")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    current = model.state_dict()
    optional = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(current) - set(state) - optional)
    unexpected = sorted(set(state) - set(current))
    reshaped = sorted(name for name in set(state) & set(current) if state[name].shape != current[name].shape)
    if missing or unexpected or reshaped:
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}, "
                         f"other shape {reshaped}")
    model.load_state_dict(state, strict=False)


@attrs.frozen(kw_only=True)
class Limits:
    """What one request may ask of the server, and who may ask: ``api_key`` (None: anyone),
    ``weights_root`` (None: no weight loading), request bodies up to ``max_body_bytes``, up to
    ``max_queue`` requests waiting or running."""

    api_key: str | None = None
    weights_root: Path | None = None
    max_body_bytes: int = 16 * 2**20
    max_queue: int = 64


class _Bearer:
    """Requires ``Authorization: Bearer <key>`` on every route but ``/health`` (for liveness
    probes), compared in constant time so the answer's timing does not leak the key."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from starlette.responses import JSONResponse

        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                refusal = JSONResponse({"error": {"message": "missing or wrong API key: send Authorization: Bearer <key>"}},
                                       status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


class _Queue:
    """At most ``limit`` POST requests inside the server at once (arriving, waiting for the model or
    running); one more gets 429 with ``Retry-After``, which clients honour."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.active = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from starlette.responses import JSONResponse

        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            refusal = JSONResponse({"error": {"message": f"{self.active} requests are queued; retry later"}},
                                   status_code=429, headers={"Retry-After": "1"})
            return await refusal(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def _inside(root: Path, path: str) -> Path | None:
    """``path`` (absolute, or relative to ``root``) resolved, links and ``..`` included, if it
    lies inside ``root``; else None."""
    folder = (root / path).resolve()
    return folder if folder.is_relative_to(root.resolve()) else None


def build_app(teacher: Any, tokenizer: Any, model_name: str, limits: Limits = Limits()) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    lock = asyncio.Lock()  # one pass at a time, as a single local model serves them
    model = getattr(teacher, "model", None)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message}}, status_code=status)

    async def json_body(request: Request) -> Any:
        """The parsed body, or the error answer: 413 past ``max_body_bytes`` (read no further), 400
        when it is not JSON."""
        if int(request.headers.get("content-length") or 0) > limits.max_body_bytes:
            return error(413, f"the body is larger than {limits.max_body_bytes} bytes")
        data = b""
        async for part in request.stream():
            data += part
            if len(data) > limits.max_body_bytes:
                return error(413, f"the body is larger than {limits.max_body_bytes} bytes")
        try:
            return json.loads(data)
        except ValueError:
            return error(400, "body is not JSON")

    async def completions(request: Request) -> Any:
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        fields = _request(body, tokenizer)
        if isinstance(fields, str):
            return error(400, fields)
        if context and len(fields["prompt"]) + fields["max_tokens"] > context:
            return error(400, f"prompt ({len(fields['prompt'])} tokens) plus max_tokens ({fields['max_tokens']}) "
                              f"exceeds the model's context of {context} tokens")
        if model is None and fields["max_tokens"] and fields["temperature"] != 0:
            return error(400, "this backend cannot sample: send temperature 0 (greedy) or max_tokens 0")
        async with lock:
            result = await _completion(teacher, model, tokenizer, fields, model_name)
        if fields["stream"]:
            return StreamingResponse(_events(result), media_type="text/event-stream")
        return Response(json.dumps(result), media_type="application/json")  # logprobs may be -inf

    async def load_weights(request: Request) -> Any:
        if limits.weights_root is None:
            return error(403, "weight loading is off: start distill-serve with --weights-root DIR")
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            return error(400, 'send {"path": FOLDER}')
        folder = _inside(limits.weights_root, body["path"])
        if folder is None:
            return error(403, "the folder is outside the server's --weights-root")
        if model is None:
            return error(400, "this backend has no model to load weights into")
        async with lock:
            try:
                await asyncio.to_thread(_load_weights, model, folder)
            except (OSError, ValueError, RuntimeError) as failed:
                return error(422, f"cannot load weights from {body['path']}: {failed}")
        return JSONResponse({"status": "loaded"})

    async def models(request: Request) -> Any:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model"}]})

    async def health(request: Request) -> Any:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[
        Route("/inference/v1/completions", completions, methods=["POST"]),
        Route("/distill/v1/load_weights", load_weights, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
    ])
    app = _Queue(app, limits.max_queue)
    return _Bearer(app, limits.api_key) if limits.api_key else app  # a refused caller takes no place in the queue
