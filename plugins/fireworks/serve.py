"""``distill-serve``: any registered teacher as a service, in the Fireworks completions dialect.

    distill-serve --model PATH [--backend hf] [--host 127.0.0.1] [--port 8000]
                  [--faults 429=0.05,500=0.05,reset=0.02,stall=0.01,truncate=0.02,corrupt=0.02]

Serves ``POST /inference/v1/completions`` (token-id prompt, ``echo`` + ``logprobs`` +
``top_logprobs``, ``max_tokens: 1``), ``GET /v1/models`` and ``GET /health``, so a custom teacher
can run on another machine and a run points a ``fireworks`` teacher at it. ``--faults`` injects
failures at the given rates (for testing clients); ``GET /faults`` reports what was injected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.types import ScoreRequest

__all__ = ["FaultPlan", "build_app", "main"]

FAULTS = ("429", "500", "reset", "stall", "truncate", "corrupt")


class FaultPlan:
    """Draws at most one fault per request at the configured rates; counts what it injected."""

    def __init__(self, rates: dict[str, float], seed: int, stall_s: float) -> None:
        unknown = set(rates) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; choose from {', '.join(FAULTS)}")
        self.rates = rates
        self.stall_s = stall_s
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(seed)

    @classmethod
    def parse(cls, text: str, seed: int, stall_s: float) -> FaultPlan:
        rates = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, rate = item.partition("=")
            rates[name.strip()] = float(rate)
        return cls(rates, seed, stall_s)

    def draw(self) -> str | None:
        roll, edge = self._rng.random(), 0.0
        for name, rate in self.rates.items():
            edge += rate
            if roll < edge:
                self.injected[name] += 1
                return name
        return None


async def _echo_body(teacher: Any, tokenizer: Any, sequence: Sequence[int], top_k: int, model: str) -> dict[str, Any]:
    """Score ``sequence`` as the Fireworks API echoes it: one entry per token, then one generated."""
    request = ScoreRequest(prompt_ids=tuple(sequence[:1]), completion_ids=tuple(sequence[1:]))
    (scores,) = await teacher.score([request], top_k=top_k)
    (generated,) = await teacher.complete([sequence], max_new_tokens=1)

    def token(i: int) -> str:
        return tokenizer.convert_ids_to_tokens(int(i)) if tokenizer is not None else str(i)

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


def build_app(teacher: Any, tokenizer: Any, model_name: str, faults: FaultPlan | None = None) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    lock = asyncio.Lock()  # one scoring pass at a time, as a single local model serves them

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message}}, status_code=status)

    async def completions(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "body is not JSON")
        prompt = body.get("prompt")
        if not isinstance(prompt, list) or len(prompt) < 2 or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return error(400, "prompt must be a list of at least two token ids")
        if not body.get("echo") or not body.get("logprobs"):
            return error(400, "this server scores prompts: send echo: true and logprobs: true")
        top_k = body.get("top_logprobs") or 0
        if not isinstance(top_k, int) or not 0 <= top_k <= 5:
            return error(400, "top_logprobs must be an integer between 0 and 5")
        if tokenizer is not None and any(not 0 <= t < len(tokenizer) for t in prompt):
            return error(400, f"token ids must be in [0, {len(tokenizer)})")
        fault = faults.draw() if faults else None
        if fault == "429":
            return Response(status_code=429, headers={"Retry-After": "0.05"})
        if fault == "500":
            return error(500, "injected server error")
        if fault == "stall":
            await asyncio.sleep(faults.stall_s)
        async with lock:
            result = await _echo_body(teacher, tokenizer, prompt, top_k, model_name)
        if fault == "corrupt":
            result["choices"][0]["logprobs"]["content"][-2]["logprob"] = None
        payload = json.dumps(result).encode()
        if fault == "truncate":
            return Response(payload[: len(payload) // 2], media_type="application/json")
        if fault == "reset":
            return _Reset()
        return Response(payload, media_type="application/json")

    async def models(request: Request) -> Any:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model"}]})

    async def health(request: Request) -> Any:
        return JSONResponse({"status": "ok"})

    async def injected(request: Request) -> Any:
        return JSONResponse(dict(faults.injected) if faults else {})

    return Starlette(routes=[
        Route("/inference/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
        Route("/faults", injected),
    ])


class _Reset:
    """An ASGI response that starts and then drops the connection, as a crashed server does."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b'{"choices": [', "more_body": True})
        raise ConnectionResetError("injected connection reset")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="teacher model folder (or hub id)")
    parser.add_argument("--backend", default="hf", help="registered teacher backend to serve (default: hf)")
    parser.add_argument("--served-name", default=None, help="model name in responses (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--faults", default="", help="fault rates, e.g. 429=0.05,500=0.05,reset=0.02")
    parser.add_argument("--fault-seed", type=int, default=0)
    parser.add_argument("--stall-s", type=float, default=30.0, help="how long an injected stall lasts")
    args = parser.parse_args(argv)

    import uvicorn

    from distill.config import converter
    from distill.manager import PluginManager
    from distill.types import BuildContext

    spec = PluginManager().get("teacher", args.backend)
    options = converter.structure({"model": args.model}, spec.config_cls)
    context = BuildContext(run_config=None, output_dir=Path("."), seed=0, device="cpu")
    teacher = spec.factory(options, context)
    faults = FaultPlan.parse(args.faults, args.fault_seed, args.stall_s) if args.faults else None
    app = build_app(teacher, getattr(teacher, "tokenizer", None), args.served_name or args.model, faults)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
