"""Token alignment: completion targets sit at P-1 … P+C-2 for the student, T-1 … T+C-2 for a teacher."""

import pytest
import torch

from distill.align import AlignmentError, build_token_batch, completion_positions
from distill.types import PromptRow, Rollout, TeacherScores


def _row(prompt, index=1):
    return PromptRow(index=index, messages=(), prompt_ids=tuple(prompt))


def _rollout(prompt, completion, lps=None):
    lps = lps if lps is not None else [-0.5] * len(completion)
    return Rollout(row=_row(prompt), completion_ids_C=torch.tensor(completion),
                   sampling_logprobs_C=torch.tensor(lps), model_logprobs_C=torch.tensor(lps) - 0.1,
                   finished=True)


def test_completion_positions_are_p_minus_one_to_p_plus_c_minus_two():
    assert completion_positions(3, 2) == slice(2, 4)
    assert completion_positions(1, 1) == slice(0, 1)
    with pytest.raises(ValueError):
        completion_positions(0, 3)


def test_token_batch_layout_by_hand():
    # sequence 0: prompt [5, 6, 7] + completion [8, 9]; sequence 1: prompt [5] + completion [4, 3, 2]
    rollouts = [_rollout([5, 6, 7], [8, 9], [-1.0, -2.0]), _rollout([5], [4, 3, 2], [-3.0, -4.0, -5.0])]
    scores = [TeacherScores(logprobs_C=torch.tensor([-0.1, -0.2])),
              TeacherScores(logprobs_C=torch.tensor([-0.3, -0.4, -0.5]))]
    batch = build_token_batch(rollouts, scores, pad_id=0)
    # inputs are x[:-1], right padded
    assert batch.input_ids_B_L.tolist() == [[5, 6, 7, 8], [5, 4, 3, 0]]
    assert batch.attention_mask_B_L.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.positions_B_C.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert batch.mask_B_C.tolist() == [[True, True, False], [True, True, True]]
    # the input at each target position predicts exactly the completion token
    for b in range(2):
        full = list(rollouts[b].prompt_ids) + rollouts[b].completion_ids_C.tolist()
        for j in range(int(batch.mask_B_C[b].sum())):
            pos = int(batch.positions_B_C[b, j])
            assert full[pos + 1] == int(batch.completion_ids_B_C[b, j])
    assert batch.num_tokens == 5
    assert batch.completion_ids_N.tolist() == [8, 9, 4, 3, 2]
    assert batch.teacher_logprobs_N.tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5])
    assert batch.sampling_logprobs_N.tolist() == [-1.0, -2.0, -3.0, -4.0, -5.0]


def test_select_trims_to_the_longest_selected_sequence():
    rollouts = [_rollout([5, 6, 7], [8, 9]), _rollout([5], [4])]
    scores = [TeacherScores(logprobs_C=torch.zeros(2)), TeacherScores(logprobs_C=torch.zeros(1))]
    batch = build_token_batch(rollouts, scores, pad_id=0).select(1, 2)
    assert batch.input_ids_B_L.tolist() == [[5]]
    assert batch.completion_ids_N.tolist() == [4]


def test_teacher_with_wrong_number_of_logprobs_is_an_alignment_error():
    rollouts = [_rollout([5, 6], [8, 9, 1])]
    with pytest.raises(AlignmentError, match=r"2,\) logprobs for a completion of 3 tokens .*dataset line 1"):
        build_token_batch(rollouts, [TeacherScores(logprobs_C=torch.zeros(2))], pad_id=0)


def test_student_and_teacher_targets_line_up_with_different_prompt_lengths(tiny_models):
    """A teacher with a longer or shorter prompt scores the same completion tokens, token for token."""
    import asyncio

    from transformers import AutoModelForCausalLM

    from distill.plugins.hf.teacher import HFTeacher
    from distill.types import ScoreRequest

    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    teacher = HFTeacher(model, None, batch_size=8)
    completion = (20, 21, 22, 1)
    for prompt in [(7, 8), (7, 8, 9, 10, 11, 12), (9,)]:
        scores = asyncio.run(teacher.score([ScoreRequest(prompt_ids=prompt, completion_ids=completion)], top_k=3))[0]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([prompt + completion])).logits[0].float(), -1)
        T = len(prompt)
        expected = [logprobs[T - 1 + j, tok] for j, tok in enumerate(completion)]
        assert scores.logprobs_C.tolist() == pytest.approx([float(e) for e in expected], abs=1e-5)
        assert scores.topk_ids_C_K.shape == (4, 3)
