"""The teacher pool: per-teacher prompts line up with the student's tokens, teachers score concurrently,
every result is checked and a teacher breaking the contract is named with the rule and the row."""

import asyncio
import json
from collections import Counter

import attrs
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill import TeacherRef, TeacherScorer, TeacherScores
from distill.errors import PluginError
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
                       router=RoutedRouter({"x": "t"}, RoutedOptions()), blender=None, top_k=0, vocab_size=64)
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
                       router=RoutedRouter({"a": "a", "b": "b"}, RoutedOptions()), blender=None, top_k=0, vocab_size=64)
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


class _Faulty(HFTeacher):
    """The real local teacher with one mistake a plugin under development might make."""

    def __init__(self, model, fault):
        super().__init__(model, None, batch_size=4)
        self.fault = fault

    async def score(self, requests, *, top_k, hidden=False):
        results = await super().score(requests, top_k=top_k, hidden=hidden)
        fault, last = self.fault, results[-1]
        if fault == "swapped":
            results = [attrs.evolve(r, topk_ids_C_K=r.topk_logprobs_C_K, topk_logprobs_C_K=r.topk_ids_C_K)
                       for r in results]
        elif fault == "lists":
            results[-1] = attrs.evolve(last, logprobs_C=last.logprobs_C.tolist())
        elif fault == "out_of_vocabulary":
            ids = last.topk_ids_C_K.clone()
            ids[2, 1] = self.model.config.vocab_size
            results[-1] = attrs.evolve(last, topk_ids_C_K=ids)
        elif fault == "duplicate_ids":
            ids = last.topk_ids_C_K.clone()
            ids[1, 1] = ids[1, 0]
            results[-1] = attrs.evolve(last, topk_ids_C_K=ids)
        elif fault == "mass_above_one":
            results[-1] = attrs.evolve(last, topk_logprobs_C_K=torch.full_like(last.topk_logprobs_C_K, -0.1))
        elif fault == "nan":
            results[-1] = attrs.evolve(last, logprobs_C=last.logprobs_C.index_fill(0, torch.tensor([3]), float("nan")))
        elif fault == "one_candidate_short":
            results[-1] = attrs.evolve(last, topk_logprobs_C_K=last.topk_logprobs_C_K[:, :-1])
        return results


@pytest.mark.parametrize(("fault", "where", "rule"), [
    ("swapped", "dataset line 5", "topk_ids_C_K must be torch.long vocabulary ids, got torch.float32"),
    ("lists", "dataset line 9", "logprobs_C must be a torch.Tensor, got list"),
    ("out_of_vocabulary", "dataset line 9, completion position 2", "topk_ids_C_K must be vocabulary ids in [0, 75)"),
    ("duplicate_ids", "dataset line 9, completion position 1", "top-K candidate ids must be distinct within a position"),
    ("mass_above_one", "dataset line 9, completion position 0", "top-K probabilities must not sum above 1"),
    ("nan", "dataset line 9, completion position 3", "logprobs_C must be finite log-probabilities (≤ 0)"),
    ("one_candidate_short", "dataset line 9",
     "topk_logprobs_C_K must have shape [4, 3], one entry per completion token, got [4, 2]"),
])
def test_a_teacher_breaking_the_contract_is_named_with_the_rule_and_the_dataset_line(tiny_models, fault, where, rule):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    refs = {"bad": TeacherRef(name="bad", route_value="bad", prompt_key="teacher_messages", blend_weight=1.0,
                              backend="faulty", path="teachers[1]")}
    pool = TeacherPool(teachers={"bad": _Faulty(model, fault)}, refs=refs, router=RoutedRouter({"x": "bad"}, RoutedOptions()),
                       blender=None, top_k=3, vocab_size=model.config.vocab_size)
    rows = [PromptRow(index=line, messages=(), prompt_ids=STUDENT_PROMPT, metadata={"teacher": "x"}) for line in (5, 9)]
    with pytest.raises(PluginError) as err:
        asyncio.run(pool.score([_rollout(rows[0], [20, 21, 1]), _rollout(rows[1], [20, 21, 22, 1])]))
    assert str(err.value) == (f"teacher 'bad' (teachers[1], backend 'faulty') broke the scoring contract on {where}: "
                              f"{rule}. Fix the backend; distill.testing.check_teacher checks these rules in its own tests.")


class _Counting(TeacherScorer):
    """A teacher with state of its own, as a remote teacher's counters."""

    def __init__(self):
        self.calls = 0

    async def score(self, requests, *, top_k):
        self.calls += 1
        return [TeacherScores(logprobs_C=torch.full((len(r.completion_ids),), -1.0)) for r in requests]

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_the_pools_state_carries_its_books_and_each_teachers_own_state():
    def pool():
        return TeacherPool(teachers={"a": _Counting()}, refs=_refs(a="m"), router=RoutedRouter({"a": "a"}, RoutedOptions()),
                           blender=None, top_k=0, vocab_size=64)

    first = pool()
    row = PromptRow(index=1, messages=(), prompt_ids=(1, 2), metadata={"teacher": "a"})
    for _ in range(2):
        first.record(asyncio.run(first.score([_rollout(row, [3, 4])]))[2])
    resumed = pool()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint stores it
    assert resumed.teachers["a"].calls == 2
    assert resumed.totals["a"].requests == 2 and resumed.totals["a"].tokens == 4
