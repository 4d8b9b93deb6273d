"""The ``distill-serve`` application: a teacher (or the student) answering the Fireworks dialect.

``POST /inference/v1/completions`` with ``echo`` scores the token-id prompt (``logprobs`` +
``top_logprobs``, ``max_tokens: 1``); without it, it samples ``n`` completions with ``raw_output``
ids and both ``logprob`` and ``sampling_logprob``. ``POST /distill/v1/load_weights {"path": FOLDER}``
hot-loads new weights; ``GET /v1/models``, ``GET /health``.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distill import ScoreRequest
from distill.plugins.hf.generation import generate, special_ids

__all__ = ["build_app"]

def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(int(token_id)) if tokenizer is not None else str(token_id)


async def _echo_body(teacher: Any, tokenizer: Any, sequence: Sequence[int], top_k: int, model: str) -> dict[str, Any]:
    """Score ``sequence`` as the Fireworks API echoes it: one entry per token, then one generated."""
    request = ScoreRequest(prompt_ids=tuple(sequence[:1]), completion_ids=tuple(sequence[1:]))
    (scores,) = await teacher.score([request], top_k=top_k)
    (generated,) = await teacher.complete([sequence], max_new_tokens=1)
    token = functools.partial(_token_text, tokenizer)
    content = [{"token": token(sequence[0]), "token_id": int(sequence[0]), "logprob": None, "top_logprobs": []}]
    for j, tok in enumerate(sequence[1:]):
        entry = {"token": token(tok), "token_id": int(tok), "logprob": float(scores.logprobs_C[j])}
        entry["top_logprobs"] = [
            {"token": token(i), "token_id": int(i), "logprob": float(lp)}
            for i, lp in zip(scores.topk_ids_C_K[j].tolist(), scores.topk_logprobs_C_K[j].tolist(), strict=True)
        ] if top_k else []
        content.append(entry)
    content.append({"token": token(generated[0]), "token_id": int(generated[0]), "logprob": 0.0, "top_logprobs": []})
    return {"object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": {"content": content},
                         "raw_output": {"prompt_token_ids": list(sequence), "completion_token_ids": generated}}]}


def _sample_body(model: Any, tokenizer: Any, prompt: list[int], sampling: dict[str, Any], model_name: str) -> dict[str, Any]:
    """``n`` completions as the Fireworks API returns them with ``raw_output`` and ``logprobs``."""
    eos, pad = special_ids(model)
    outputs = generate(model, [prompt] * sampling["n"], max_new_tokens=sampling["max_tokens"], eos_id=eos,
                       pad_id=pad, temperature=sampling["temperature"] or 1.0, top_k=sampling["top_k"],
                       top_p=sampling["top_p"], greedy=sampling["temperature"] == 0,
                       generator=torch.Generator().manual_seed(sampling["seed"]))
    token = functools.partial(_token_text, tokenizer)
    choices = []
    for index, out in enumerate(outputs):
        ids = out.ids_C.tolist()
        content = [{"token": token(i), "token_id": i, "logprob": float(lp), "sampling_logprob": float(slp),
                    "top_logprobs": []}
                   for i, lp, slp in zip(ids, out.model_logprobs_C.tolist(), out.sampling_logprobs_C.tolist(), strict=True)]
        choices.append({"index": index, "text": "", "finish_reason": "stop" if out.finished else "length",
                        "logprobs": {"content": content},
                        "raw_output": {"prompt_token_ids": prompt, "completion_token_ids": ids}})
    return {"object": "text_completion", "model": model_name, "choices": choices}


def _sampling_settings(body: dict[str, Any]) -> dict[str, Any] | str:
    """The sampling fields of a request, or what is wrong with them."""
    settings = {"n": body.get("n", 1), "max_tokens": body.get("max_tokens", 16), "top_k": body.get("top_k", 0),
                "seed": body.get("seed", 0), "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0)}
    for name in ("n", "max_tokens", "top_k", "seed"):
        if not isinstance(settings[name], int) or isinstance(settings[name], bool) or settings[name] < 0:
            return f"{name} must be a non-negative integer"
    if not 1 <= settings["n"] <= 128 or settings["max_tokens"] < 1:
        return "n must be in [1, 128] and max_tokens at least 1"
    if not isinstance(settings["temperature"], (int, float)) or not 0 <= settings["temperature"] <= 100:
        return "temperature must be in [0, 100]"
    if not isinstance(settings["top_p"], (int, float)) or not 0 < settings["top_p"] <= 1:
        return "top_p must be in (0, 1]"
    return settings


def _load_weights(model: Any, folder: Path) -> None:
    """Load every ``*.safetensors`` in ``folder`` into ``model`` in place, or change nothing: names
    and shapes are checked before any tensor is copied. A tied head may be absent."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors file in {folder}")
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


def build_app(teacher: Any, tokenizer: Any, model_name: str) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    lock = asyncio.Lock()  # one pass at a time, as a single local model serves them
    model = getattr(teacher, "model", None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message}}, status_code=status)

    async def completions(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "body is not JSON")
        prompt = body.get("prompt")
        if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return error(400, "prompt must be a non-empty list of token ids")
        if tokenizer is not None and any(not 0 <= t < len(tokenizer) for t in prompt):
            return error(400, f"token ids must be in [0, {len(tokenizer)})")
        if not body.get("logprobs"):
            return error(400, "send logprobs: true (this server answers with token ids and logprobs)")
        if body.get("echo"):
            top_k = body.get("top_logprobs") or 0
            if len(prompt) < 2:
                return error(400, "scoring needs a prompt of at least two token ids")
            if not isinstance(top_k, int) or not 0 <= top_k <= 5:
                return error(400, "top_logprobs must be an integer between 0 and 5")
            def work() -> Any:
                return _echo_body(teacher, tokenizer, prompt, top_k, model_name)
        else:
            sampling = _sampling_settings(body)
            if isinstance(sampling, str):
                return error(400, sampling)
            if model is None:
                return error(400, "this backend scores only: it has no model to sample from")
            def work() -> Any:
                return asyncio.to_thread(_sample_body, model, tokenizer, prompt, sampling, model_name)
        async with lock:
            result = await work()
        return Response(json.dumps(result), media_type="application/json")  # logprobs may be -inf

    async def load_weights(request: Request) -> Any:
        try:
            folder = Path((await request.json())["path"])
        except (ValueError, KeyError, TypeError):
            return error(400, 'send {"path": FOLDER}')
        if model is None:
            return error(400, "this backend has no model to load weights into")
        async with lock:
            try:
                await asyncio.to_thread(_load_weights, model, folder)
            except (OSError, ValueError, RuntimeError) as failed:
                return error(422, f"cannot load weights from {folder}: {failed}")
        return JSONResponse({"status": "loaded"})

    async def models(request: Request) -> Any:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model"}]})

    async def health(request: Request) -> Any:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/inference/v1/completions", completions, methods=["POST"]),
        Route("/distill/v1/load_weights", load_weights, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
    ])
