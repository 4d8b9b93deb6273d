"""Fault injection for testing clients: an ASGI middleware in front of the ``distill-serve`` app,
a test fixture (``tests/plugins/faulty_serve.py`` starts it), never a production flag.

Each completions request draws at most one fault: first the ``first`` counts, in order (a fault
for each of the first N requests), then at the configured rates. Faults: ``429`` (``Retry-After``
in seconds), ``429_date`` (``Retry-After`` as an HTTP date 2 s ahead), ``404`` and ``425`` (not
ready), ``500``, ``stall`` (answer after ``stall_s``), ``reset`` (drop the connection mid-body),
``truncate`` (half the body), ``corrupt`` (one scored logprob becomes null), ``finish_error``
(every choice finishes with ``"error"``). ``omit`` strips optional fields from every answer:
``sampling_logprob``, ``usage``, ``candidate_token_id`` (top-K candidates keep only ``token``) or
``candidate_token_id_as_id`` (their id sent as ``id``). Every fault applies to streamed requests
(``stream: true``) too: the injector asks the app for the JSON answer, edits it, and sends it as
the app's own server-sent events would be. Three faults exist only for streamed requests (a plain
request never draws them): ``stream_no_done`` (no ``data: [DONE]``), ``stream_unfinished`` (no
choice gets a ``finish_reason``) and ``stream_bad_chunk`` (the first chunk is not JSON). ``GET
/faults`` reports what was injected. The serving app itself knows nothing of this.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections import Counter
from typing import Any

from distill.plugins.serve.app import _events

__all__ = ["FAULTS", "OMITTABLE", "STREAM_ONLY", "FaultPlan", "FaultInjector"]

STREAM_ONLY = ("stream_no_done", "stream_unfinished", "stream_bad_chunk")
FAULTS = ("429", "429_date", "404", "425", "500", "reset", "stall", "truncate", "corrupt", "finish_error", *STREAM_ONLY)
OMITTABLE = ("sampling_logprob", "usage", "candidate_token_id", "candidate_token_id_as_id")
COMPLETIONS = "/inference/v1/completions"
EDITED = ("reset", "truncate", "corrupt", "finish_error", *STREAM_ONLY)  # faults that rewrite the app's answer


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

    def draw(self, streamed: bool = False) -> str | None:
        """The fault for the next request; a stream-only fault is never drawn for a plain one."""
        for name, left in self.first.items():
            if left and (streamed or name not in STREAM_ONLY):
                self.first[name] -= 1
                self.injected[name] += 1
                return name
        roll, edge = self._rng.random(), 0.0
        for name, rate in self.rates.items():
            edge += rate
            if roll < edge:
                if name in STREAM_ONLY and not streamed:
                    return None
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


def _edited(payload: bytes, omit: frozenset[str], finish_reason: str | None = "keep") -> bytes:
    """The answer without the ``omit`` fields, every choice finishing with ``finish_reason`` unless
    it is "keep"."""
    body = json.loads(payload)
    if "usage" in omit:
        body.pop("usage", None)
    for choice in body["choices"]:
        if finish_reason != "keep":
            choice["finish_reason"] = finish_reason
        for entry in (choice.get("logprobs") or {}).get("content") or ():
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
        request = await _read(receive)
        try:
            asked = json.loads(request)
            streamed = isinstance(asked, dict) and bool(asked.get("stream"))
        except ValueError:
            streamed = False
        fault = self.plan.draw(streamed)
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
            return await self.app(scope, _replay(request, receive), send)
        if streamed:  # the JSON answer, to edit and then send as the app's events would be
            request = json.dumps({**asked, "stream": False}).encode()
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-length"]
                     + [(b"content-length", str(len(request)).encode())]}
        status, chunks = 200, []

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, _replay(request, receive), capture)
        payload = b"".join(chunks)
        if status != 200:
            return await _send(send, status, payload)
        finish = {"finish_error": "error", "stream_unfinished": None}.get(fault, "keep")
        if self.plan.omit or finish != "keep":
            payload = _edited(payload, self.plan.omit, finish)
        if fault == "corrupt":
            payload = _corrupted(payload)
        if streamed:
            return await _send_events(send, fault, [event async for event in _events(json.loads(payload))])
        if fault == "truncate":
            return await _send(send, 200, payload[: len(payload) // 2])
        if fault != "reset":
            return await _send(send, 200, payload)
        await send({"type": "http.response.start", "status": 200,  # reset: promise more than is sent
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b'{"choices": [', "more_body": True})
        raise ConnectionResetError("injected connection reset")


async def _send_events(send: Any, fault: str | None, events: list[bytes]) -> None:
    """The events, less what ``fault`` takes away: the last (``data: [DONE]``), the first chunk's
    JSON, or the second half of the stream (cut mid-event by ``truncate``, the connection dropped by
    ``reset``)."""
    if fault == "stream_no_done":
        events = events[:-1]
    elif fault == "stream_bad_chunk":
        events = [events[0][: len(events[0]) // 2] + b"\n\n", *events[1:]]
    stream = b"".join(events)
    if fault in ("truncate", "reset"):
        stream = stream[: len(stream) // 2]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": stream, "more_body": fault == "reset"})
    if fault == "reset":
        raise ConnectionResetError("injected connection reset")


async def _read(receive: Any) -> bytes:
    """The whole request body."""
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(parts)
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives ``body`` once, then what the client sends (its disconnect)."""
    given = False

    async def replay() -> dict[str, Any]:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
