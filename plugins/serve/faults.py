"""Fault injection for testing clients: an ASGI middleware in front of the ``distill-serve`` app.

Each completions request draws at most one fault at the configured rates: ``429`` (with
``Retry-After``), ``500``, ``stall`` (answer after ``stall_s``), ``reset`` (drop the connection
mid-body), ``truncate`` (half the body) or ``corrupt`` (one scored logprob becomes null).
``GET /faults`` reports what was injected. The serving app itself knows nothing of this.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

__all__ = ["FAULTS", "FaultPlan", "FaultInjector"]

FAULTS = ("429", "500", "reset", "stall", "truncate", "corrupt")
COMPLETIONS = "/inference/v1/completions"


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


def _corrupted(payload: bytes) -> bytes:
    """The last scored logprob set to null: with echo the last entry is the generated token, which
    clients drop, so the one before it."""
    body = json.loads(payload)
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    echoed = len(content) > len(choice["raw_output"]["completion_token_ids"])
    content[-2 if echoed else -1]["logprob"] = None
    return json.dumps(body).encode()


class FaultInjector:
    """Wraps an ASGI app; faults only hit ``POST /inference/v1/completions``."""

    def __init__(self, app: Any, plan: FaultPlan) -> None:
        self.app = app
        self.plan = plan

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/faults":
            return await _send(send, 200, json.dumps(dict(self.plan.injected)).encode())
        if scope["type"] != "http" or scope["path"] != COMPLETIONS:
            return await self.app(scope, receive, send)
        fault = self.plan.draw()
        if fault == "429":
            return await _send(send, 429, b"", [(b"retry-after", b"0.05")])
        if fault == "500":
            return await _send(send, 500, b'{"error": {"message": "injected server error"}}')
        if fault == "stall":
            await asyncio.sleep(self.plan.stall_s)
        if fault not in ("reset", "truncate", "corrupt"):
            return await self.app(scope, receive, send)
        status, chunks = 200, []

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        payload = b"".join(chunks)
        if status != 200:
            return await _send(send, status, payload)
        if fault == "corrupt":
            return await _send(send, 200, _corrupted(payload))
        if fault == "truncate":
            return await _send(send, 200, payload[: len(payload) // 2])
        await send({"type": "http.response.start", "status": 200,  # reset: promise more than is sent
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b'{"choices": [', "more_body": True})
        raise ConnectionResetError("injected connection reset")


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
