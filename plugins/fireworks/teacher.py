"""A teacher behind an OpenAI-compatible completions endpoint, in the Fireworks or vLLM dialect.

Every response is validated before use — echoed ids equal what was sent, lengths match, logprobs
are finite at every scored position, K candidates are present — and a response that fails is
retried; one that keeps failing drops its rollout with a counted reason, never misaligned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import torch

from distill import BuildContext, DistillError, ScoreFailure, ScoreRequest, TeacherScorer, TeacherScores
from distill.plugins.fireworks.client import Invalid, JsonClient, RequestFailed, client_for, finite, indexed_choices

__all__ = ["RemoteTeacher", "candidate_id", "parse_fireworks_echo", "parse_vllm_prompt_logprobs", "scoring_request"]


def candidate_id(candidate: Any, tokenizer: Any = None) -> int | None:
    """A top-K candidate's id: ``token_id``, else ``id`` (both optional in the API), else what its
    ``token`` text tokenizes to when that is exactly one id (the cookbook's fallback); else None."""
    for key in ("token_id", "id"):
        value = candidate.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    token = candidate.get("token")
    if tokenizer is None or not isinstance(token, str):
        return None
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _scores(logprobs: list[float], candidates: list[list[tuple[int, float]]] | None) -> TeacherScores:
    if candidates is None:
        return TeacherScores(logprobs_C=torch.tensor(logprobs))
    return TeacherScores(
        logprobs_C=torch.tensor(logprobs),
        topk_ids_C_K=torch.tensor([[i for i, _ in row] for row in candidates], dtype=torch.long),
        topk_logprobs_C_K=torch.tensor([[lp for _, lp in row] for row in candidates]),
    )


def parse_fireworks_echo(body: Any, sequence: Sequence[int], prompt_len: int, top_k: int,
                         resolve: Callable[[Any], int | None] = candidate_id) -> TeacherScores:
    """``content[i]`` scores sequence token i (``content[0]`` has no condition); the extra generated
    token at the end is ignored. Candidates are resolved by ``resolve``; one it cannot resolve is
    dropped, and a position left with fewer than ``top_k`` makes the reply invalid."""
    try:
        (choice,) = indexed_choices(body, 1)
        content = choice["logprobs"]["content"]
        if len(content) < len(sequence):
            raise Invalid("short_echo")
        if any(entry["token_id"] != token for entry, token in zip(content, sequence, strict=False)):
            raise Invalid("echo_mismatch")
        logprobs, candidates = [], []
        for entry in content[prompt_len : len(sequence)]:
            logprobs.append(finite(entry["logprob"], "non_finite_logprob"))
            if top_k:
                resolved = ((resolve(c), finite(c["logprob"], "non_finite_top_logprob"))
                            for c in entry.get("top_logprobs") or ())
                ranked = sorted(((i, lp) for i, lp in resolved if i is not None), key=lambda pair: -pair[1])
                if len(ranked) < top_k:
                    raise Invalid("missing_top_k")
                candidates.append(ranked[:top_k])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise Invalid("malformed") from None
    return _scores(logprobs, candidates if top_k else None)


def parse_vllm_prompt_logprobs(choice: Any, sequence: Sequence[int], prompt_len: int, top_k: int) -> TeacherScores:
    """``prompt_logprobs[i]`` maps token ids (as strings) to ``{logprob, rank}`` for position i;
    the echoed ``prompt_token_ids`` (asked for with ``return_token_ids``) must equal what was sent."""
    try:
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and list(echoed) != list(sequence):
            raise Invalid("echo_mismatch")
        positions = choice["prompt_logprobs"]
        if len(positions) != len(sequence):
            raise Invalid("length_mismatch")
        logprobs, candidates = [], []
        for token, entry in zip(sequence[prompt_len:], positions[prompt_len:], strict=True):
            if str(token) not in entry:
                raise Invalid("echo_mismatch")
            logprobs.append(finite(entry[str(token)]["logprob"], "non_finite_logprob"))
            if top_k:
                ranked = sorted(
                    ((int(i), finite(e["logprob"], "non_finite_top_logprob"), int(e["rank"])) for i, e in entry.items()),
                    key=lambda item: item[2],
                )
                top = [(i, lp) for i, lp, rank in ranked if rank <= top_k]
                if len(top) < top_k:
                    raise Invalid("missing_top_k")
                candidates.append(top[:top_k])
    except (KeyError, IndexError, TypeError, ValueError):
        raise Invalid("malformed") from None
    return _scores(logprobs, candidates if top_k else None)


def scoring_request(
    dialect: str, model: str, requests: Sequence[ScoreRequest], top_k: int,
    resolve: Callable[[Any], int | None] = candidate_id, stream: bool = False,
) -> tuple[str, dict[str, Any], Callable[[Any], list[TeacherScores]]]:
    """(path, body, parse) of one scoring request: ``fireworks`` takes one sequence, ``vllm`` a batch;
    ``resolve`` gives a Fireworks top-K candidate's id; ``stream`` (Fireworks only) asks for
    server-sent events, which the client assembles into the same body."""
    sequences = [[*r.prompt_ids, *r.completion_ids] for r in requests]
    lengths = [len(r.prompt_ids) for r in requests]
    if dialect == "fireworks":
        (sequence,), (prompt_len,) = sequences, lengths
        body = {"model": model, "prompt": sequence, "max_tokens": 1, "temperature": 0,
                "echo": True, "logprobs": True, "raw_output": True}
        if top_k:
            body["top_logprobs"] = top_k
        if stream:
            body["stream"] = True
        return "/inference/v1/completions", body, lambda reply: [parse_fireworks_echo(reply, sequence, prompt_len, top_k, resolve)]

    def parse(reply: Any) -> list[TeacherScores]:
        try:
            choices = indexed_choices(reply, len(sequences))
        except (KeyError, TypeError):
            raise Invalid("malformed") from None
        return [parse_vllm_prompt_logprobs(c, seq, n, top_k) for c, seq, n in zip(choices, sequences, lengths, strict=True)]

    body = {"model": model, "prompt": sequences, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": top_k, "return_token_ids": True}
    return "/v1/completions", body, parse


class RemoteTeacher(TeacherScorer):
    """Scores over HTTP (vLLM: ``batch_size`` sequences per request); each request is retried on
    its own, concurrency is bounded by an AIMD window. ``tokenizer`` resolves Fireworks candidates
    that carry only their text; ``unresolved_candidates`` counts those it could not. ``stream``
    (Fireworks only) has each reply sent as server-sent events."""

    def __init__(
        self, client: JsonClient, *, model: str, dialect: str, max_failures_in_a_row: int, batch_size: int = 16,
        tokenizer: Any = None, stream: bool = False,
    ) -> None:
        self.client = client
        self.stream = stream
        self.tokenizer = tokenizer
        self.unresolved_candidates = 0
        self.model = model
        self.dialect = dialect
        self.batch_size = batch_size
        self.max_failures_in_a_row = max_failures_in_a_row
        self.failures_in_a_row = 0
        self.dropped: dict[str, int] = {}

    @classmethod
    def build(cls, options: Any, context: BuildContext) -> RemoteTeacher:
        return cls(client_for(options, context.seed), model=options.model, dialect=options.dialect or "fireworks",
                   max_failures_in_a_row=options.max_failures_in_a_row, batch_size=options.batch_size,
                   tokenizer=context.tokenizer, stream=options.stream)

    async def aclose(self) -> None:
        await self.client.aclose()

    def counters(self) -> dict[str, Any]:
        return self.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {**self.client.state_dict(), "dropped": dict(self.dropped),
                "unresolved_candidates": self.unresolved_candidates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.client.load_state_dict(state)
        self.dropped = dict(state["dropped"])
        self.unresolved_candidates = state.get("unresolved_candidates", 0)  # absent in older checkpoints

    def _resolve(self, candidate: Any) -> int | None:
        found = candidate_id(candidate, self.tokenizer)
        self.unresolved_candidates += found is None
        return found

    async def _guarded(self, requests: Sequence[ScoreRequest], top_k: int) -> list[TeacherScores | ScoreFailure]:
        try:
            path, body, parse = scoring_request(self.dialect, self.model, requests, top_k, self._resolve, self.stream)
            scores: list[TeacherScores | ScoreFailure] = list(await self.client.post(path, body, parse))
        except RequestFailed as failed:
            if not failed.retryable:
                raise DistillError(f"Teacher {self.model!r} refused a request: {failed}") from None
            self.failures_in_a_row += 1
            self.dropped[failed.reason] = self.dropped.get(failed.reason, 0) + len(requests)
            if self.failures_in_a_row >= self.max_failures_in_a_row:
                raise DistillError(
                    f"Teacher {self.model!r} failed {self.failures_in_a_row} requests in a row (last: "
                    f"{failed}); stopping. The last checkpoint is intact: fix the server and rerun to resume."
                ) from None
            return [ScoreFailure(reason=failed.reason)] * len(requests)
        self.failures_in_a_row = 0
        return scores

    async def score(self, requests: Sequence[ScoreRequest], *, top_k: int) -> list[TeacherScores | ScoreFailure]:
        size = 1 if self.dialect == "fireworks" else self.batch_size
        batches = [requests[i : i + size] for i in range(0, len(requests), size)]
        results = await asyncio.gather(*(self._guarded(batch, top_k) for batch in batches))
        return [scores for batch in results for scores in batch]
