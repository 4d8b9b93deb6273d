"""A resilient JSON-over-HTTP client: retries with jittered backoff, Retry-After, and an AIMD window.

Retried: 408, 429, 5xx, transport errors, timeouts, truncated or non-JSON bodies, and responses
the caller rejects (``Invalid``, such as ``finish_reason: "error"``); every failed attempt is
counted by reason. 404 and 425 mean "not ready" (a Fireworks deployment that is starting or
hot-loading weights): polled without using up attempts for ``not_ready_wait_s``, then fatal. Not
retried: 400, 401, 403, 422 — the server's message is raised at once. The concurrency window grows
while the server keeps up and halves on overload (429, 5xx, timeouts, replies slow enough to risk
timeouts), so a client takes the throughput a server offers without tipping it over.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import httpx
from distill import DistillError


__all__ = ["AdaptiveWindow", "Invalid", "JsonClient", "RequestFailed", "RetryPolicy", "client_for", "finite",
           "indexed_choices", "streamed_body"]

T = TypeVar("T")

RETRY_STATUS = {408, 429}
OVERLOAD_STATUS = {429}
NOT_READY_STATUS = frozenset({404, 425})
NOT_READY_POLL_S = 5.0  # the Fireworks SDK polls a deployment that is not ready every 5 s


class Invalid(Exception):
    """The caller found the response unusable (misaligned, non-finite…); ``reason`` is counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def finite(value: Any, reason: str) -> float:
    """``value`` as a float, or :class:`Invalid` (``reason``) when it is not a finite number."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise Invalid(reason)
    return float(value)


def indexed_choices(body: Any, count: int) -> list[Any]:
    """``body["choices"]`` ordered by ``index``, which must be exactly 0 … count − 1; a choice that
    finished with ``"error"`` makes the reply a failed attempt (its tokens are not a real sample)."""
    choices = sorted(body["choices"], key=lambda choice: choice["index"])
    if [c["index"] for c in choices] != list(range(count)):
        raise Invalid("missing_choices")
    if any(c.get("finish_reason") == "error" for c in choices):
        raise Invalid("finish_error")
    return choices


KEEPALIVE_EVENTS = frozenset({"ping", "heartbeat", "keepalive"})


def _events(text: str) -> Iterator[tuple[str | None, str]]:
    """(event name, data) of each complete server-sent event (WHATWG: lines end with CR, LF or
    CRLF; ``data`` lines join with LF; an event ends at a blank line, so one cut short by the end
    of the stream is never dispatched)."""
    name, data = None, []
    for line in re.split(r"\r\n|\r|\n", text)[:-1]:  # the last is an unfinished line, or empty
        if not line:
            if data or name is not None:
                yield name, "\n".join(data)
            name, data = None, []
        elif not line.startswith(":"):  # a comment (a keep-alive)
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            elif field == "event":
                name = value


def streamed_body(text: str) -> dict[str, Any]:
    """A streamed reply (server-sent events, Fireworks format) assembled into the body the JSON reply
    would have been, so it is validated the same way: choices by ``index``, texts joined,
    ``logprobs.content`` concatenated, ``finish_reason`` and ``raw_output`` kept.

    As strict as the SDK's reader, and stricter where it would let a bad sample through: an
    ``error`` event or a chunk carrying ``error`` is ``invalid:stream_error``; a choice finishing
    with ``"error"`` is ``invalid:finish_error`` at once; a chunk that is not JSON is ``bad_json``
    (unless its event is a keep-alive) and one without the chunk's shape, or with tokens for a
    choice that already finished, is ``invalid:malformed``; a stream without ``data: [DONE]`` (cut
    off), or with a choice that never finished, is ``invalid:truncated_stream``."""
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for event, data in _events(text):
        if event == "error":
            raise Invalid("stream_error")
        if data.strip() == "[DONE]":
            if not choices or any("finish_reason" not in c for c in choices.values()):
                raise Invalid("truncated_stream")
            return {**head, "choices": [choices[i] for i in sorted(choices)]}
        if not data.strip():
            continue
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            if event in KEEPALIVE_EVENTS:
                continue
            raise
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices", []), list):
            raise Invalid("malformed")
        if chunk.get("error") is not None:
            raise Invalid("stream_error")
        head.update((key, value) for key, value in chunk.items() if key != "choices")
        for part in chunk.get("choices", []):
            _add_part(choices, part)
    raise Invalid("truncated_stream")


def _add_part(choices: dict[int, dict[str, Any]], part: Any) -> None:
    """One chunk's part of a choice added to what came before it."""
    if not isinstance(part, dict) or not isinstance(part.get("index"), int) or isinstance(part["index"], bool):
        raise Invalid("malformed")
    text, logprobs = part.get("text") or "", part.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if (not isinstance(text, str) or not isinstance(logprobs, (dict, type(None)))
            or not isinstance(content, (list, type(None)))):
        raise Invalid("malformed")
    choice = choices.setdefault(part["index"], {"index": part["index"], "text": ""})
    if "finish_reason" in choice and (text or content):
        raise Invalid("malformed")  # tokens after the choice finished
    choice["text"] += text
    if content:
        choice.setdefault("logprobs", {"content": []})["content"].extend(content)
    if part.get("finish_reason") == "error":
        raise Invalid("finish_error")  # its tokens are not a real sample
    for key in ("finish_reason", "raw_output"):
        if part.get(key) is not None:
            choice[key] = part[key]


class RequestFailed(DistillError):
    """A request failed for good: a non-retryable status, or retries exhausted."""

    def __init__(self, message: str, reason: str, retryable: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


@attrs.frozen(kw_only=True)
class RetryPolicy:
    max_attempts: int = 6
    backoff_base_s: float = 0.25
    backoff_max_s: float = 20.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Full-jitter exponential backoff, never shorter than the server's Retry-After."""
        backoff = rng.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))
        return max(backoff, retry_after or 0.0)


class AdaptiveWindow:
    """A concurrency limit for a training client: as much as the server takes, short of timeouts.

    It grows by one request per window of successes up to ``maximum`` and halves on overload:
    429, 5xx, a timeout, or a reply so slow that the next ones would risk timing out (slower than
    ``slow_s`` and than twice the least latency seen, so it is queueing, not a long request). A
    server that queues instead of refusing (vLLM) serves the same throughput beyond its saturation
    point, so the window may sit above it; the slow-reply brake keeps that queue short of the
    timeout. The first request goes alone, so the least latency is measured unloaded.

    Waiters queue first-in first-out and a released slot is handed to exactly one of them, so the
    cost per request stays constant however long the queue (a Condition woke every waiter).
    """

    def __init__(self, initial: int, maximum: int, adaptive: bool = True, slow_s: float = math.inf) -> None:
        self.limit = float(max(1, min(initial, maximum)))
        self.maximum = maximum
        self.adaptive = adaptive
        self.slow_s = slow_s
        self.in_flight = 0
        self.floor = math.inf
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def _open(self) -> int:
        return int(self.limit) if self.floor < math.inf or not self.adaptive else 1

    async def __aenter__(self) -> AdaptiveWindow:
        if not self._waiters and self.in_flight < self._open:
            self.in_flight += 1
            return self
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # resolved with the slot already counted for us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed over as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        self.in_flight -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self.in_flight < self._open:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def success(self, latency_s: float) -> None:
        if not self.adaptive:
            return
        self.floor = min(self.floor, latency_s)
        if latency_s > self.slow_s and latency_s > 2 * self.floor:
            self.overload()
        else:
            self.limit = min(self.maximum, self.limit + 1.0 / self.limit)
        self._admit()

    def overload(self) -> None:
        if self.adaptive:
            self.limit = max(1.0, self.limit / 2)


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds, given as seconds or as an HTTP date (RFC 9110)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _server_message(response: httpx.Response) -> str:
    text = response.text.strip()
    try:
        body = json.loads(text)
        text = body.get("error", {}).get("message") or body.get("detail") or text
    except (ValueError, AttributeError):
        pass
    return text[:500]


class JsonClient:
    """POSTs JSON to one endpoint and parses the reply, retrying what can be retried."""

    def __init__(
        self,
        *,
        base_url: str,
        headers: dict[str, str],
        timeout_s: float,
        policy: RetryPolicy,
        window: AdaptiveWindow,
        not_ready_wait_s: float = 180.0,
        seed: int = 0,
    ) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s)
        self.policy = policy
        self.window = window
        self.not_ready_wait_s = not_ready_wait_s
        self.failed_attempts: Counter[str] = Counter()
        self._rng = random.Random(seed)

    async def post(self, path: str, body: dict[str, Any] | None, parse: Callable[[Any], T] | None = None, *,
                   not_ready: frozenset[int] = NOT_READY_STATUS) -> T | None:
        """POST ``body``; ``parse(json)`` may raise :class:`Invalid` to have the request retried.

        Without ``parse`` only the status matters (control endpoints answer with no body, JSON or
        plain text, as vLLM's ``/v1/load_lora_adapter`` does).
        ``not_ready`` are the statuses polled as "not ready" (a control endpoint's 404 means it does
        not exist, so its caller passes only 425)."""
        last, attempt, not_ready_since, polls = "unknown", 0, None, 0
        while attempt < self.policy.max_attempts:
            retry_after, overloaded, status = None, False, 0
            async with self.window:
                started = time.perf_counter()
                try:
                    response = await self._http.post(path, json=body)
                except httpx.TimeoutException:
                    last, overloaded = "timeout", True
                except httpx.TransportError as exc:
                    last = f"transport:{type(exc).__name__}"
                else:
                    status = response.status_code
                    if status < 300:
                        if parse is None:  # a control endpoint: its body (JSON, text or none) is not ours to read
                            self.window.success(time.perf_counter() - started)
                            return None
                        try:
                            streamed = response.headers.get("content-type", "").startswith("text/event-stream")
                            reply = streamed_body(response.text) if streamed else response.json()
                            result = parse(reply)
                        except json.JSONDecodeError:
                            last = "bad_json"
                        except Invalid as bad:
                            last = f"invalid:{bad.reason}"
                        else:
                            self.window.success(time.perf_counter() - started)
                            return result
                    elif status in RETRY_STATUS or status in not_ready or status >= 500:
                        last, overloaded = f"http_{status}", status in OVERLOAD_STATUS or status >= 500
                        retry_after = _retry_after(response)
                    else:
                        raise RequestFailed(
                            f"{path} answered {status}: {_server_message(response)}",
                            reason=f"http_{status}",
                            retryable=False,
                        )
            if overloaded:
                self.window.overload()
            self.failed_attempts[last] += 1
            if status in not_ready:
                not_ready_since = not_ready_since or time.monotonic()
                left = self.not_ready_wait_s - (time.monotonic() - not_ready_since)
                if left <= 0:
                    raise RequestFailed(
                        f"{response.request.url} answered {status} (not ready) for {self.not_ready_wait_s:g} s: "
                        f"the deployment is missing, starting or loading weights. Check base_url and model, "
                        f"or wait longer with not_ready_wait_s", reason=last, retryable=False)
                backoff = min(NOT_READY_POLL_S, self.policy.backoff_base_s * 2**polls)
                polls += 1
                await asyncio.sleep(min(left, max(backoff, retry_after or 0.0)))
                continue
            not_ready_since, attempt = None, attempt + 1
            if attempt < self.policy.max_attempts:
                await asyncio.sleep(self.policy.delay(attempt - 1, retry_after, self._rng))
        raise RequestFailed(
            f"{path} failed {self.policy.max_attempts} times; last: {last}", reason=last, retryable=True
        )

    def state_dict(self) -> dict[str, Any]:
        """Failed attempts and the window, kept in checkpoints so they cover the whole run."""
        return {"failed_attempts": dict(self.failed_attempts), "window": self.window.limit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run starts at the window it had learned (a fixed window keeps its config)."""
        self.failed_attempts = Counter(state["failed_attempts"])
        if self.window.adaptive:
            self.window.limit = min(float(state["window"]), float(self.window.maximum))

    async def aclose(self) -> None:
        await self._http.aclose()


def client_for(options: Any, seed: int) -> JsonClient:
    """A client for a ``RemoteOptions``: the API key is read from its environment variable here and
    lives only in the client's headers."""
    key = os.environ.get(options.api_key_env)
    return JsonClient(
        base_url=options.base_url.rstrip("/"),
        headers={"Authorization": f"Bearer {key}"} if key else {},
        timeout_s=options.timeout_s,
        policy=RetryPolicy(max_attempts=options.max_attempts, backoff_base_s=options.backoff_base_s,
                           backoff_max_s=options.backoff_max_s),
        window=AdaptiveWindow(options.concurrency, options.max_concurrency, options.adaptive_concurrency,
                              slow_s=options.timeout_s / 2),
        not_ready_wait_s=options.not_ready_wait_s,
        seed=seed,
    )
