"""Loss math against hand-computed values and fp64 autograd of the written-out formulas."""

import math

import pytest
import torch

from distill.align import TokenBatch
from distill.plugins.losses import REFERENCE_KERNEL, SampledReverseKL, TopKForwardKL
from distill.plugins.losses.objectives import SampledReverseKLOptions, TopKForwardKLOptions


def _tokens(ids, sampling, model=None, teacher=None, topk_ids=None, topk_lps=None):
    n = len(ids)

    def col(values, dtype=torch.float64):
        return None if values is None else torch.tensor([values], dtype=dtype)

    return TokenBatch(
        input_ids_B_L=torch.zeros((1, n), dtype=torch.long),
        attention_mask_B_L=torch.ones((1, n), dtype=torch.long),
        positions_B_C=torch.arange(n)[None],
        mask_B_C=torch.ones((1, n), dtype=torch.bool),
        completion_ids_B_C=col(ids, torch.long),
        sampling_logprobs_B_C=col(sampling),
        model_logprobs_B_C=col(model if model is not None else sampling),
        teacher_logprobs_B_C=col(teacher),
        teacher_topk_ids_B_C_K=col(topk_ids, torch.long),
        teacher_topk_logprobs_B_C_K=col(topk_lps),
    )


def test_reverse_kl_loss_by_hand():
    tokens = _tokens([0, 1], sampling=[-1.0, -2.0], teacher=[-0.5, -3.0])
    current = torch.tensor([[-1.0], [-1.5]], dtype=torch.float64)  # ratio 1 and e^0.5
    loss, metrics = SampledReverseKL(SampledReverseKLOptions(loss_scale=2.0))(current, tokens)
    expected = -(1.0 * 2.0 * (-0.5 + 1.0) + math.exp(0.5) * 2.0 * (-3.0 + 2.0))
    assert float(loss) == pytest.approx(expected)
    assert float(metrics["advantage"]) == pytest.approx(2.0 * 0.5 + 2.0 * -1.0)
    assert float(metrics["importance_ratio"]) == pytest.approx(1 + math.exp(0.5))


def test_reverse_kl_clamps_the_log_ratio_and_stops_its_gradient():
    tokens = _tokens([0], sampling=[-10.0], teacher=[-1.0])
    current = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)  # log ratio 9 > cap 2
    loss, metrics = SampledReverseKL(SampledReverseKLOptions(ratio_log_cap=2.0))(current, tokens)
    assert float(loss.detach()) == pytest.approx(-math.exp(2.0) * 9.0)
    assert float(metrics["ratio_clamped_fraction"]) == 1.0
    loss.backward()
    assert float(current.grad) == 0.0


def test_reverse_kl_model_baseline_uses_raw_logprobs():
    tokens = _tokens([0], sampling=[-1.0], model=[-1.7], teacher=[-1.2])
    current = torch.tensor([[-1.0]], dtype=torch.float64)
    loss, _ = SampledReverseKL(SampledReverseKLOptions(baseline="model"))(current, tokens)
    assert float(loss) == pytest.approx(-(-1.2 + 1.7))


def test_reverse_kl_gradient_is_reinforce_estimate_of_kl_gradient_fp64():
    """At the sampling weights, dL/dlogits = -(A_t) * (onehot - p), checked against fp64 autograd."""
    torch.manual_seed(0)
    V, H, N = 11, 5, 6
    hidden = torch.randn(N, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (N,))
    with torch.no_grad():
        sampling = torch.log_softmax(hidden @ weight.T, -1).gather(1, ids[:, None]).squeeze(1)
    teacher = torch.randn(N, dtype=torch.float64) - 2
    tokens = _tokens(ids.tolist(), sampling.tolist(), teacher=teacher.tolist())
    lp = REFERENCE_KERNEL(hidden, weight, ids[:, None])
    loss, _ = SampledReverseKL(SampledReverseKLOptions())(lp, tokens)
    loss.backward()
    probs = torch.softmax(hidden @ weight.detach().T, -1)
    advantage = teacher - sampling
    dlogits = -advantage[:, None] * (torch.nn.functional.one_hot(ids, V) - probs)
    torch.testing.assert_close(weight.grad, dlogits.T @ hidden, rtol=1e-10, atol=1e-12)


def test_topk_forward_kl_by_hand_and_its_gradient():
    torch.manual_seed(1)
    V, H = 7, 4
    hidden = torch.randn(2, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    topk_ids = [[3, 1, 5], [0, 6, 2]]
    topk_lps = [[-0.5, -1.5, -2.5], [-0.2, -2.0, -9.0]]  # renormalised over the three
    tokens = _tokens([3, 0], sampling=[0.0, 0.0], teacher=[0.0, 0.0], topk_ids=topk_ids, topk_lps=topk_lps)
    lp = REFERENCE_KERNEL(hidden, weight, torch.tensor(topk_ids))
    loss, metrics = TopKForwardKL(TopKForwardKLOptions(top_k=3))(lp, tokens)
    q = torch.softmax(torch.tensor(topk_lps, dtype=torch.float64), -1)
    log_p = torch.log_softmax(hidden @ weight.detach().T, -1)
    expected = -sum(float(q[t, j] * log_p[t, topk_ids[t][j]]) for t in range(2) for j in range(3))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    teacher_mass = sum(math.exp(torch.logsumexp(torch.tensor(row), 0)) for row in topk_lps)
    assert float(metrics["teacher_topk_mass"]) == pytest.approx(teacher_mass)
    loss.backward()
    # d/dlogits of -sum_j q_j log p_{k_j} = p - scatter(q)
    target = torch.zeros(2, V, dtype=torch.float64).scatter_(1, torch.tensor(topk_ids), q)
    torch.testing.assert_close(weight.grad, (log_p.exp() - target).T @ hidden, rtol=1e-10, atol=1e-12)


def test_reference_kernel_matches_log_softmax_and_upcasts_bf16():
    torch.manual_seed(2)
    hidden = torch.randn(4, 8, dtype=torch.bfloat16)
    weight = torch.randn(16, 8, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 2], [3, 3], [0, 15], [7, 8]])
    out = REFERENCE_KERNEL(hidden, weight, ids)
    assert out.dtype == torch.float32
    full = torch.log_softmax(hidden.float() @ weight.float().T, -1)
    torch.testing.assert_close(out, full.gather(1, ids))


def _full_vocabulary_batch(heads_B, hidden_B_C_G, heads):
    B, C = hidden_B_C_G.shape[:2]
    return TokenBatch(
        input_ids_B_L=torch.zeros((B, C), dtype=torch.long), attention_mask_B_L=torch.ones((B, C), dtype=torch.long),
        positions_B_C=torch.arange(C).repeat(B, 1), mask_B_C=torch.tensor([[True] * C, [True] * (C - 1) + [False]]),
        completion_ids_B_C=torch.zeros((B, C), dtype=torch.long), sampling_logprobs_B_C=torch.zeros((B, C)),
        model_logprobs_B_C=torch.zeros((B, C)), teacher_hidden_B_C_G=hidden_B_C_G,
        teacher_head_B=torch.tensor(heads_B), teacher_heads=heads,
    )


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_full_vocabulary_divergence_scores_each_token_against_the_head_of_its_own_teacher(beta):
    from distill.plugins.losses.objectives import FullVocabularyDivergence

    g = torch.Generator().manual_seed(0)
    V, H, G = 11, 4, 6
    weight_V_H = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    heads = (torch.randn(V, G, generator=g, dtype=torch.float64), torch.randn(V + 3, G, generator=g, dtype=torch.float64))
    hidden_B_C_G = torch.randn(2, 3, G, generator=g, dtype=torch.float64)
    tokens = _full_vocabulary_batch([1, 0], hidden_B_C_G, heads)  # row 0: the padded head, row 1: the other
    hidden_N_H = torch.randn(5, H, generator=g, dtype=torch.float64)
    loss, metrics = FullVocabularyDivergence(beta=beta, temperature=2.0).loss(hidden_N_H, weight_V_H,
                                                                               REFERENCE_KERNEL, tokens)
    expected = sum(
        REFERENCE_KERNEL.divergence(hidden_N_H[rows], weight_V_H, tokens.teacher_hidden_N_G[rows], head[:V],
                                    beta=beta, temperature=2.0).sum()
        for rows, head in ((slice(0, 3), heads[1]), (slice(3, 5), heads[0]))
    )
    torch.testing.assert_close(loss, expected)
    assert float(metrics["divergence"]) == pytest.approx(float(expected))
    loss.backward()
    assert weight_V_H.grad.abs().sum() > 0


def test_a_full_vocabulary_loss_needs_teachers_with_hidden_states(manager):
    from distill.config import parse_config
    from distill.errors import ConfigError

    raw = {"student": {"model": "s"}, "data": {"train": "t.jsonl"}, "loss": {"name": "full_reverse_kl"},
           "teachers": [{"backend": "hf", "model": "local"},
                        {"backend": "vllm", "base_url": "http://127.0.0.1:1", "model": "remote"}]}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == [
        "loss 'full_reverse_kl' needs the teacher's hidden states and output head (its whole distribution), which "
        "teacher backend 'vllm' does not provide (it gives per-token logprobs, top-K candidates); use a local teacher "
        "(backend 'hf') or a loss such as sampled_reverse_kl or topk_forward_kl @ teachers[1].backend"
    ]
    assert parse_config({**raw, "teachers": raw["teachers"][:1]}, manager).router.name == "single"


@pytest.mark.parametrize(("staleness", "warned"), [(0, False), (1, True)])
def test_pipelined_sampled_reverse_kl_warns_that_it_diverged_on_the_demo(manager, staleness, warned):
    from structlog.testing import capture_logs

    from distill.config import config_context, parse_config

    config = parse_config({"student": {"model": "s"}, "data": {"train": "t.jsonl"},
                           "teachers": [{"backend": "hf", "model": "t"}],
                           "train": {"max_staleness": staleness}}, manager)
    with capture_logs() as logs:
        manager.build("loss", "sampled_reverse_kl", config.loss.options, config_context(config, manager))
    assert [log["log_level"] for log in logs] == (["warning"] if warned else [])
    assert all("sampled_reverse_kl with train.max_staleness = 1" in log["event"] for log in logs)
