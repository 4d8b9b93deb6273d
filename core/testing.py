"""Contract checks for plugin authors: run them in your plugin's tests against a real instance.

    from distill.testing import check_sampler, check_teacher

    def test_my_teacher_keeps_the_contract():
        asyncio.run(check_teacher(MyTeacher(...), vocab_size=16))

Each check drives the component the way the training loop does and raises ``AssertionError``
naming the broken rule, so a backend that would misalign a run fails in its own test suite first.
The default inputs use token ids below 16; pass ``requests``/``rows`` for a smaller vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from distill.data import sample_seed
from distill.scoring import scores_problem
from distill.types import PromptRow, Rollout, SamplingParams, ScoreFailure, ScoreRequest, TeacherScores

__all__ = ["check_sampler", "check_teacher", "check_same_scores", "default_requests", "default_rows"]


def default_requests() -> list[ScoreRequest]:
    """Prompts and completions of different lengths, a repeated token included."""
    return [
        ScoreRequest(prompt_ids=(2, 5, 6, 3), completion_ids=(7, 8, 1)),
        ScoreRequest(prompt_ids=(2, 9, 3), completion_ids=(10,)),
        ScoreRequest(prompt_ids=(4, 11, 12, 13, 14, 3), completion_ids=(7, 7, 15, 1)),
    ]


def default_rows() -> list[PromptRow]:
    return [PromptRow(index=i + 1, messages=(), prompt_ids=r.prompt_ids) for i, r in enumerate(default_requests())]


def _fail(rule: str, where: str) -> None:
    raise AssertionError(f"{rule} ({where})")


def _check_logprobs(values: Any, length: int, what: str, where: str) -> None:
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.shape[0] != length:
        _fail(f"{what} must be a 1-D tensor with one entry per completion token ({length})", where)
    if not bool(torch.isfinite(values).all()) or bool((values > 1e-6).any()):
        _fail(f"{what} must be finite log-probabilities (≤ 0)", where)


def _check_candidates(request: ScoreRequest, result: TeacherScores, where: str) -> None:
    ids, logprobs = result.topk_ids_C_K, result.topk_logprobs_C_K
    if bool((logprobs[:, 1:] > logprobs[:, :-1] + 1e-6).any()):
        _fail("top-K candidates must be sorted by logprob, most likely first", where)
    for c, token in enumerate(request.completion_ids):
        hit = (ids[c] == token).nonzero()
        if hit.numel() and not math.isclose(float(logprobs[c, hit[0, 0]]), float(result.logprobs_C[c]), abs_tol=1e-4):
            _fail("a scored token among the top-K must carry the same logprob in both", f"{where}, position {c}")


async def check_teacher(
    teacher: Any, *, top_k: int = 4, requests: Sequence[ScoreRequest] | None = None, vocab_size: int | None = None
) -> None:
    """``score`` answers every request in order with a :class:`ScoreFailure` carrying a reason, or
    with scores the training run accepts (the rules :func:`distill.scoring.scores_problem` checks at
    run time: CPU tensors of the right dtype and shape, finite logprobs ≤ 0 and, with ``top_k``, K
    distinct ids below ``vocab_size`` whose probabilities sum to at most 1); besides, top-K
    candidates are sorted by logprob and a scored token among them carries the same logprob in both.
    Scoring is deterministic. ``top_k`` defaults to 4, as a top-K loss asks; pass 0 for a teacher
    that only scores the sampled tokens."""
    requests = list(requests or default_requests())
    results = await teacher.score(requests, top_k=top_k)
    if len(results) != len(requests):
        _fail(f"score returned {len(results)} results for {len(requests)} requests", "score")
    scored = []
    for i, result in enumerate(results):
        if not isinstance(result, ScoreFailure):
            scored.append(i)
        elif not isinstance(result.reason, str) or not result.reason:
            _fail("a ScoreFailure needs a non-empty reason (it is counted by it)", f"request {i}")
    found = scores_problem([results[i] for i in scored], [len(requests[i].completion_ids) for i in scored],
                           top_k=top_k, vocab_size=vocab_size)
    if found is not None:
        index, position, rule = found
        _fail(rule, f"request {scored[index]}" + ("" if position is None else f", position {position}"))
    for i in scored:
        if top_k:
            _check_candidates(requests[i], results[i], f"request {i}")
    again = await teacher.score(requests, top_k=top_k)
    for i, (first, second) in enumerate(zip(results, again, strict=True)):
        if isinstance(first, TeacherScores) and isinstance(second, TeacherScores) and not torch.allclose(
            first.logprobs_C, second.logprobs_C, atol=1e-5, rtol=0
        ):
            _fail("scoring the same request twice must give the same logprobs (the teacher is frozen)", f"request {i}")


async def check_same_scores(
    teacher: Any, reference: Any, *, top_k: int = 0, requests: Sequence[ScoreRequest] | None = None,
    atol: float = 1e-4,
) -> None:
    """``teacher`` scores like ``reference`` (e.g. a remote server against the same model run
    locally): the same logprobs within ``atol``, the same top-K ids in the same order."""
    requests = list(requests or default_requests())
    expected = await reference.score(requests, top_k=top_k)
    got = await teacher.score(requests, top_k=top_k)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        if not torch.allclose(have.logprobs_C, want.logprobs_C, atol=atol, rtol=0):
            _fail(f"logprobs differ from the reference's by more than {atol}", f"request {i}")
        if top_k and have.topk_ids_C_K.tolist() != want.topk_ids_C_K.tolist():
            _fail("top-K ids differ from the reference's", f"request {i}")
        if top_k and not torch.allclose(have.topk_logprobs_C_K, want.topk_logprobs_C_K, atol=atol, rtol=0):
            _fail(f"top-K logprobs differ from the reference's by more than {atol}", f"request {i}")


async def check_sampler(
    sampler: Any, *, rows: Sequence[PromptRow] | None = None, params: SamplingParams | None = None, seed: int = 0
) -> None:
    """``sample`` returns ``n`` rollouts per row, grouped and in row order, each with 1 to
    ``max_new_tokens`` ids and one finite logprob of each kind per id; the same seeds and weights give
    the same rollouts, and a row sampled alone gets what it got beside the others; ``complete``
    returns one id list per prompt; ``sync_weights`` is awaitable."""
    rows = list(rows or default_rows())
    params = params or SamplingParams(max_new_tokens=6, n=2)
    seeds = [sample_seed(seed, i) for i in range(len(rows))]
    await sampler.sync_weights(0)
    rollouts = await sampler.sample(rows, params, seeds=seeds)
    if len(rollouts) != params.n * len(rows):
        _fail(f"sample returned {len(rollouts)} rollouts for {len(rows)} rows × n={params.n}", "sample")
    for i, rollout in enumerate(rollouts):
        where = f"rollout {i}"
        if not isinstance(rollout, Rollout):
            _fail(f"rollouts must be Rollout, got {type(rollout).__name__}", where)
        if rollout.row is not rows[i // params.n]:
            _fail("rollouts must be grouped by row, n per row, in row order, each carrying its row", where)
        ids = rollout.completion_ids_C
        if ids.dtype != torch.long or ids.dim() != 1 or not 1 <= ids.shape[0] <= params.max_new_tokens:
            _fail(f"completion_ids_C must be a torch.long 1-D tensor of 1 to {params.max_new_tokens} ids", where)
        _check_logprobs(rollout.sampling_logprobs_C, ids.shape[0], "sampling_logprobs_C", where)
        _check_logprobs(rollout.model_logprobs_C, ids.shape[0], "model_logprobs_C", where)
        if not isinstance(rollout.finished, bool):
            _fail("finished must be a bool (did the completion end with EOS)", where)
    again = await sampler.sample(rows, params, seeds=seeds)
    if [r.completion_ids_C.tolist() for r in again] != [r.completion_ids_C.tolist() for r in rollouts]:
        _fail("the same seeds and weights must give the same rollouts (a resumed run repeats its steps)", "sample")
    last = await sampler.sample(rows[-1:], params, seeds=seeds[-1:])
    if [r.completion_ids_C.tolist() for r in last] != [r.completion_ids_C.tolist() for r in rollouts[-params.n:]]:
        _fail("a row sampled alone must get the completions it got beside other rows (its seed alone decides "
              "them, so processes sharing a step sample what one process would)", "sample")
    completions = await sampler.complete([row.prompt_ids for row in rows], max_new_tokens=params.max_new_tokens)
    if len(completions) != len(rows) or not all(
        isinstance(ids, list) and len(ids) <= params.max_new_tokens and all(isinstance(t, int) for t in ids)
        for ids in completions
    ):
        _fail(f"complete must return one list of at most {params.max_new_tokens} int ids per prompt", "complete")
