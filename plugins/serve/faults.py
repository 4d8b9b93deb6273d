"""Fault injection for testing clients: an ASGI middleware in front of the ``distill-serve`` app,
a test fixture (``tests/plugins/faulty_serve.py`` starts it), never a production flag.

Each completions request draws at most one fault: first the ``first`` counts, in order (a fault
for each of the first N requests), then at the configured rates. Faults: ``429`` (``Retry-After``
in seconds), ``429_date`` (``Retry-After`` as an HTTP date 2 s ahead), ``404`` and ``425`` (not
ready), ``500``, ``stall`` (answer after ``stall_s``), ``reset`` (drop the connection mid-body),
``truncate`` (half the body), ``corrupt`` (one scored logprob becomes null), ``finish_error``
(every choice finishes with ``"error"``). ``omit`` strips optional fields from every answer:
``sampling_logprob``, ``usage``, ``candidate_token_id`` (top-K candidates keep only ``token``) or
``candidate_token_id_as_id`` (their id sent as ``id``); faults that edit an answer read it as
JSON, so they are for non-streamed requests. ``GET /faults`` reports what was injected.
The serving app itself knows nothing of this.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections import Counter
from typing import Any

__all__ = ["FAULTS", "OMITTABLE", "FaultPlan", "FaultInjector"]

FAULTS = ("429", "429_date", "404", "425", "500", "reset", "stall", "truncate", "corrupt", "finish_error")
OMITTABLE = ("sampling_logprob", "usage", "candidate_token_id", "candidate_token_id_as_id")
COMPLETIONS = "/inference/v1/completions"
EDITED = ("reset", "truncate", "corrupt", "finish_error")  # faults that rewrite the app's answer


class FaultPlan:
    """Draws at most one fault per request; counts what it injected."""

    def __init__(self, rates: dict[str, float], seed: int, stall_s: float, first: dict[str, int] | None = None,
                 omit: frozenset[str] = frozenset()) -> None:
        first = first or {}
        unknown = (set(rates) | set(first)) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; choose from {', '.join(FAULTS)}")
        if omit - set(OMITTABLE):
            raise ValueError(f"cannot omit {sorted(omit - set(OMITTABLE))}; choose from {', '.join(OMITTABLE)}")
        self.rates = rates
        self.stall_s = stall_s
        self.first = Counter(first)
        self.omit = omit
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(seed)

    @classmethod
    def parse(cls, text: str, seed: int, stall_s: float, first: dict[str, int] | None = None,
              omit: frozenset[str] = frozenset()) -> FaultPlan:
        rates = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, rate = item.partition("=")
            rates[name.strip()] = float(rate)
        return cls(rates, seed, stall_s, first, omit)

    def draw(self) -> str | None:
        for name, left in self.first.items():
            if left:
                self.first[name] -= 1
                self.injected[name] += 1
                return name
        roll, edge = self._rng.random(), 0.0
        for name, rate in self.rates.items():
            edge += rate
            if roll < edge:
                self.injected[name] += 1
                return name
        return None


def _corrupted(payload: bytes) -> bytes:
    """The last scored logprob set to null: with echo (the choice's text is more than its
    completion) the last entry is the generated token, which clients drop, so the one before it."""
    body = json.loads(payload)
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    echoed = choice["text"] != choice["raw_output"]["completion"]
    content[-2 if echoed else -1]["logprob"] = None
    return json.dumps(body).encode()


def _edited(payload: bytes, omit: frozenset[str], finish_error: bool) -> bytes:
    """The answer without the ``omit`` fields, every choice finishing with "error" if asked."""
    body = json.loads(payload)
    if "usage" in omit:
        body.pop("usage", None)
    for choice in body["choices"]:
        if finish_error:
            choice["finish_reason"] = "error"
        for entry in choice["logprobs"]["content"]:
            if "sampling_logprob" in omit:
                entry.pop("sampling_logprob", None)
            for candidate in entry.get("top_logprobs") or ():
                if "candidate_token_id" in omit:
                    del candidate["token_id"]
                elif "candidate_token_id_as_id" in omit:
                    candidate["id"] = candidate.pop("token_id")
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
        if fault in ("404", "425"):
            return await _send(send, int(fault), b'{"error": {"message": "injected: the deployment is not ready"}}')
        if fault == "429":
            return await _send(send, 429, b"", [(b"retry-after", b"0.05")])
        if fault == "429_date":
            when = email.utils.formatdate(time.time() + 2, usegmt=True)
            return await _send(send, 429, b"", [(b"retry-after", when.encode())])
        if fault == "500":
            return await _send(send, 500, b'{"error": {"message": "injected server error"}}')
        if fault == "stall":
            await asyncio.sleep(self.plan.stall_s)
        if fault not in EDITED and not self.plan.omit:
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
        if self.plan.omit or fault == "finish_error":
            payload = _edited(payload, self.plan.omit, fault == "finish_error")
        if fault == "corrupt":
            return await _send(send, 200, _corrupted(payload))
        if fault == "truncate":
            return await _send(send, 200, payload[: len(payload) // 2])
        if fault != "reset":
            return await _send(send, 200, payload)
        await send({"type": "http.response.start", "status": 200,  # reset: promise more than is sent
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b'{"choices": [', "more_body": True})
        raise ConnectionResetError("injected connection reset")


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
