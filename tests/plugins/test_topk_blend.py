"""Probability-union blending against hand-computed blends."""

import math

import pytest
import torch

from distill import TeacherScores, WeightedScores
from distill.plugins.topk_blend import BlendError, ProbabilityUnion


def _teacher(name, weight, ids, probs, sampled=None):
    ids_C_K = torch.tensor([ids])
    logprobs = torch.log(torch.tensor([probs], dtype=torch.float64)).float()
    sampled = torch.tensor([math.log(sampled if sampled is not None else probs[0])])
    return WeightedScores(name, weight, TeacherScores(logprobs_C=sampled, topk_ids_C_K=ids_C_K, topk_logprobs_C_K=logprobs))


def _blend(*teachers, k=2):
    out = ProbabilityUnion().blend(teachers, top_k=k, where="dataset line 7")
    return out.topk_ids_C_K[0].tolist(), out.topk_logprobs_C_K[0].exp().tolist(), out


def test_overlapping_supports_add_mass_then_keep_top_k_renormalised():
    # A renormalised over its 2: {5: .75, 9: .25}; B: {9: .5, 3: .5}; weights 1 and 3 -> .25 / .75
    a = _teacher("a", 1.0, [5, 9], [0.6, 0.2])
    b = _teacher("b", 3.0, [9, 3], [0.4, 0.4])
    ids, probs, _ = _blend(a, b)
    # union mass: 5: .25*.75 = .1875, 9: .25*.25 + .75*.5 = .4375, 3: .375 -> keep 9 and 3
    assert ids == [9, 3]
    assert probs == pytest.approx([0.4375 / 0.8125, 0.375 / 0.8125], rel=1e-6)


def test_disjoint_supports_compete_by_weighted_mass():
    a = _teacher("a", 1.0, [1, 2], [0.9, 0.1])
    b = _teacher("b", 1.0, [3, 4], [0.7, 0.3])
    ids, probs, _ = _blend(a, b)
    assert ids == [1, 3]
    assert probs == pytest.approx([0.45 / 0.8, 0.35 / 0.8], rel=1e-6)


def test_ties_go_to_the_lower_token_id():
    a = _teacher("a", 1.0, [8, 2], [0.5, 0.5])
    b = _teacher("b", 1.0, [6, 4], [0.5, 0.5])
    ids, probs, _ = _blend(a, b)
    assert ids == [2, 4]
    assert probs == pytest.approx([0.5, 0.5])


def test_sampled_token_logprob_is_the_weighted_mixture():
    a = _teacher("a", 1.0, [1, 2], [0.5, 0.5], sampled=0.2)
    b = _teacher("b", 3.0, [1, 2], [0.5, 0.5], sampled=0.6)
    _, _, out = _blend(a, b)
    assert float(out.logprobs_C[0]) == pytest.approx(math.log(0.25 * 0.2 + 0.75 * 0.6), rel=1e-6)


def test_a_single_teacher_blend_is_its_renormalised_top_k():
    ids, probs, _ = _blend(_teacher("a", 2.0, [7, 3, 1], [0.3, 0.1, 0.05]), k=3)
    assert ids == [7, 3, 1]
    assert probs == pytest.approx([0.3 / 0.45, 0.1 / 0.45, 0.05 / 0.45], rel=1e-6)


def test_a_teacher_with_fewer_than_k_candidates_is_an_error_naming_it_and_the_position():
    short = WeightedScores("short", 1.0, TeacherScores(
        logprobs_C=torch.zeros(2),
        topk_ids_C_K=torch.tensor([[1, 2, 3], [1, 2, -1]]),
        topk_logprobs_C_K=torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.0, float("-inf")]]),
    ))
    with pytest.raises(BlendError) as err:
        ProbabilityUnion().blend([short], top_k=3, where="dataset line 7")
    assert str(err.value) == (
        "teacher 'short' returned 2 top-K candidates at completion position 1 (dataset line 7), "
        "fewer than top_k = 3; lower loss.top_k or fix the teacher"
    )
    narrow = _teacher("narrow", 1.0, [1, 2], [0.5, 0.5])
    with pytest.raises(BlendError, match="teacher 'narrow' returned 2 top-K candidates at completion position 0"):
        ProbabilityUnion().blend([narrow], top_k=3, where="dataset line 7")


def test_blending_is_vectorised_over_positions():
    torch.manual_seed(0)
    C, K = 5, 4
    teachers = []
    for name, weight in (("a", 1.0), ("b", 0.5)):
        ids = torch.stack([torch.randperm(10)[:K] for _ in range(C)])
        teachers.append(WeightedScores(name, weight, TeacherScores(
            logprobs_C=torch.zeros(C), topk_ids_C_K=ids, topk_logprobs_C_K=torch.randn(C, K))))
    out = ProbabilityUnion().blend(teachers, top_k=K)
    for c in range(C):
        mass = {}
        for t in teachers:
            q = torch.softmax(t.scores.topk_logprobs_C_K[c].double(), -1) * t.weight / 1.5
            for i, p in zip(t.scores.topk_ids_C_K[c].tolist(), q.tolist(), strict=True):
                mass[i] = mass.get(i, 0.0) + p
        best = sorted(mass.items(), key=lambda kv: (-kv[1], kv[0]))[:K]
        total = sum(p for _, p in best)
        assert out.topk_ids_C_K[c].tolist() == [i for i, _ in best]
        assert out.topk_logprobs_C_K[c].exp().tolist() == pytest.approx([p / total for _, p in best], rel=1e-5)
