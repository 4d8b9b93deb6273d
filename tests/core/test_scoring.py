"""The teacher pool: per-teacher prompts line up with the student's tokens, teachers score concurrently."""

import asyncio
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill import TeacherRef, TeacherScorer, TeacherScores
from distill.plugins.hf.teacher import HFTeacher
from distill.plugins.routing import RoutedOptions, RoutedRouter
from distill.scoring import TeacherPool
from distill.types import PromptRow, Rollout

STUDENT_PROMPT = (2, 30, 31, 5, 3)


def _refs(**prompt_keys):
    return {name: TeacherRef(name=name, route_value=name, prompt_key=key, blend_weight=1.0, backend="test",
                             path=f"teachers[{i}]") for i, (name, key) in enumerate(prompt_keys.items())}


def _rollout(row, completion):
    c = torch.tensor(completion)
    return Rollout(row=row, completion_ids_C=c, sampling_logprobs_C=torch.zeros(len(completion)),
                   model_logprobs_C=torch.zeros(len(completion)), finished=True)


@pytest.mark.parametrize("teacher_prompt", [(4, 40, 41, 42, 43, 44, 45, 5, 2, 30, 31, 5, 3), (2, 31, 3)])
def test_privileged_teacher_scores_the_students_tokens_after_its_own_prompt(tiny_models, teacher_prompt):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    completion = [20, 21, 22, 1]
    pool = TeacherPool(teachers={"t": HFTeacher(model, None, 8)}, refs=_refs(t="hint"),
                       router=RoutedRouter({"x": "t"}, RoutedOptions()), blender=None, top_k=0)
    row = PromptRow(index=1, messages=(), prompt_ids=STUDENT_PROMPT, teacher_prompts={"hint": teacher_prompt},
                    metadata={"teacher": "x"})
    kept, targets, books = asyncio.run(pool.score([_rollout(row, completion)]))
    with torch.no_grad():
        logits = model(torch.tensor([list(teacher_prompt) + completion])).logits[0]
    T = len(teacher_prompt)
    expected = torch.log_softmax(logits.float(), -1)[T - 1 : T + 3].gather(1, torch.tensor(completion)[:, None]).squeeze(1)
    torch.testing.assert_close(targets[0].logprobs_C, expected, atol=1e-5, rtol=1e-5)
    assert books["t"].rows == 1 and books["t"].tokens == 4 and books["t"].requests == 1


class _SlowTeacher(TeacherScorer):
    """Counts the teachers scoring at once across every instance sharing ``gauge``."""

    def __init__(self, gauge):
        self.gauge = gauge

    async def score(self, requests, *, top_k):
        self.gauge["now"] += 1
        self.gauge["peak"] = max(self.gauge["peak"], self.gauge["now"])
        await asyncio.sleep(0.01)
        self.gauge["now"] -= 1
        return [TeacherScores(logprobs_C=torch.full((len(r.completion_ids),), -1.0)) for r in requests]


def test_teachers_score_concurrently_and_keep_their_own_books():
    gauge = {"now": 0, "peak": 0}
    pool = TeacherPool(teachers={"a": _SlowTeacher(gauge), "b": _SlowTeacher(gauge)}, refs=_refs(a="m", b="m"),
                       router=RoutedRouter({"a": "a", "b": "b"}, RoutedOptions()), blender=None, top_k=0)
    rows = [PromptRow(index=i, messages=(), prompt_ids=(1, 2), metadata={"teacher": r})
            for i, r in enumerate(["a", "b", "b", "zzz"])]
    rollouts = [_rollout(row, [3, 4, 5]) for row in rows for _ in range(2)]
    skipped = Counter()
    kept, targets, books = asyncio.run(pool.score(rollouts, skipped))
    pool.record(books)
    assert gauge["peak"] == 2  # both teachers were scoring at the same time
    assert [r.row.index for r in kept] == [0, 0, 1, 1, 2, 2]
    assert skipped == {"unknown_route:zzz": 1}  # once per row, not per completion
    assert (books["a"].rows, books["a"].requests, books["a"].tokens) == (1, 2, 6)
    assert (books["b"].rows, books["b"].requests, books["b"].tokens) == (2, 4, 12)
    assert books["b"].peak_in_flight == 4 and books["b"].in_flight == 0
    assert books["a"].reverse_kl == pytest.approx(1.0)
    assert pool.totals["b"].tokens == 12
