"""The chunked full-vocabulary divergence against the reference kernel: values, dh and dW.

TRL's generalised JSD for beta in {0 (forward KL), 0.1, 0.5, 0.9, 1 (reverse KL)} at temperatures 1
and 2. Tiles are smaller than the shapes (row_chunk 5 and vocab_block 16 over N = 13, V = 70), so
every test crosses several row chunks and vocabulary blocks, ragged last ones included, and the
teacher's hidden size (24) differs from the student's (16).
"""

import pytest
import torch

from distill.plugins.fused_losses import ChunkedKernel
from distill.plugins.losses import REFERENCE_KERNEL

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


@pytest.fixture(params=["several_row_chunks", "one_row_chunk"])
def kernel(request):
    if request.param == "several_row_chunks":
        return ChunkedKernel(row_chunk=5, vocab_block=16)
    return ChunkedKernel(row_chunk=64, vocab_block=16)  # dW blocks written straight from the matmul


def _inputs(n=13, h=16, g=24, v=70, dtype=torch.float64, seed=0):
    """Student and teacher hidden states and heads, logits with a standard deviation of about 2."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)

    return randn(n, h), randn(v, h, std=2 / h**0.5), randn(n, g), randn(v, g, std=2 / g**0.5)


def _values_and_grads(kernel, inputs, grad_N, beta, temperature):
    """(D, dh, dW) of ``Σ grad · D`` with fresh student leaves."""
    hidden_N_H, weight_V_H, teacher_hidden_N_G, teacher_weight_V_G = inputs
    hidden_N_H = hidden_N_H.detach().clone().requires_grad_()
    weight_V_H = weight_V_H.detach().clone().requires_grad_()
    divergence_N = kernel.divergence(
        hidden_N_H, weight_V_H, teacher_hidden_N_G, teacher_weight_V_G, beta=beta, temperature=temperature
    )
    (divergence_N * grad_N.to(divergence_N.dtype)).sum().backward()
    return divergence_N.detach(), hidden_N_H.grad, weight_V_H.grad


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", BETAS)
def test_matches_reference_in_fp64_and_skips_masked_rows(kernel, beta, temperature):
    inputs = _inputs()
    grad_N = torch.randn(13, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_N[[1, 6, 7]] = 0.0  # masked rows
    ours = _values_and_grads(kernel, inputs, grad_N, beta, temperature)
    reference = _values_and_grads(REFERENCE_KERNEL, inputs, grad_N, beta, temperature)
    for name, actual, expected in zip(("D", "dh", "dW"), ours, reference):
        assert actual.dtype == torch.float64
        assert _relative_error(actual, expected) <= 1e-6, name
    assert torch.count_nonzero(ours[1][[1, 6, 7]]) == 0


@pytest.mark.parametrize("beta", BETAS)
def test_all_rows_masked_gives_exact_zero_gradients(beta):
    inputs = _inputs()
    divergence_N, dh_N_H, dw_V_H = _values_and_grads(
        ChunkedKernel(row_chunk=5, vocab_block=16), inputs, torch.zeros(13), beta, 1.0
    )
    assert _relative_error(divergence_N, REFERENCE_KERNEL.divergence(*inputs, beta=beta, temperature=1.0)) <= 1e-6
    assert torch.count_nonzero(dh_N_H) == 0 and torch.count_nonzero(dw_V_H) == 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bf16_matches_fp32_reference(beta):
    """bf16 logits carry ~2⁻⁹ relative rounding from the matmul: D within 5e-3, gradients within 2e-2."""
    inputs = _inputs(n=40, h=32, g=48, v=200, dtype=torch.bfloat16, seed=2)
    grad_N = torch.randn(40, generator=torch.Generator().manual_seed(3))
    grad_N[::3] = 0.0
    ours = _values_and_grads(ChunkedKernel(row_chunk=16, vocab_block=64), inputs, grad_N, beta, 2.0)
    assert ours[0].dtype == torch.float32  # fp32 statistics, like the reference
    assert ours[1].dtype == ours[2].dtype == torch.bfloat16
    reference = _values_and_grads(REFERENCE_KERNEL, [x.float() for x in inputs], grad_N, beta, 2.0)
    for name, actual, expected, tolerance in zip(("D", "dh", "dW"), ours, reference, (5e-3, 2e-2, 2e-2)):
        assert _relative_error(actual, expected) <= tolerance, name


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradcheck(beta):
    hidden_N_H, weight_V_H, teacher_hidden_N_G, teacher_weight_V_G = _inputs(n=4, h=3, g=5, v=7, seed=4)
    kernel = ChunkedKernel(row_chunk=3, vocab_block=3)

    def divergence(hidden_N_H, weight_V_H):
        return kernel.divergence(
            hidden_N_H, weight_V_H, teacher_hidden_N_G, teacher_weight_V_G, beta=beta, temperature=1.5
        )

    assert torch.autograd.gradcheck(divergence, (hidden_N_H.requires_grad_(), weight_V_H.requires_grad_()))


def test_teacher_gets_no_gradient_even_when_it_requires_one():
    hidden_N_H, weight_V_H, teacher_hidden_N_G, teacher_weight_V_G = _inputs()
    hidden_N_H.requires_grad_()
    teacher_hidden_N_G.requires_grad_()
    teacher_weight_V_G.requires_grad_()
    divergence_N = ChunkedKernel(row_chunk=5, vocab_block=16).divergence(
        hidden_N_H, weight_V_H, teacher_hidden_N_G, teacher_weight_V_G, beta=0.5, temperature=1.0
    )
    divergence_N.sum().backward()
    assert hidden_N_H.grad is not None
    assert teacher_hidden_N_G.grad is None and teacher_weight_V_G.grad is None


@pytest.mark.parametrize("beta", BETAS)
def test_nonnegative_and_zero_when_the_student_is_the_teacher(beta):
    inputs = _inputs()
    kernel = ChunkedKernel(row_chunk=5, vocab_block=16)
    assert torch.all(_values_and_grads(kernel, inputs, torch.ones(13), beta, 1.0)[0] >= 0)
    hidden_N_H, weight_V_H = inputs[:2]
    same = _values_and_grads(kernel, (hidden_N_H, weight_V_H, hidden_N_H, weight_V_H), torch.ones(13), beta, 2.0)
    assert same[0].abs().max() <= 1e-12
    assert same[1].abs().max() <= 1e-12 and same[2].abs().max() <= 1e-12  # a minimum: zero gradient


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_saves_inputs_and_per_row_statistics_only(beta):
    """No [N, V] tensor survives until backward: saved are the four inputs and [N] statistics."""
    inputs = _inputs()
    hidden_N_H = inputs[0].clone().requires_grad_()
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ChunkedKernel(row_chunk=5, vocab_block=16).divergence(hidden_N_H, *inputs[1:], beta=beta, temperature=1.0)
    assert {(13, 16), (70, 16), (13,)} <= set(shapes) <= {(13, 16), (70, 16), (13, 24), (70, 24), (13,)}


def test_rejects_bad_beta_temperature_and_mismatched_teacher():
    kernel = ChunkedKernel()
    hidden_N_H, weight_V_H, teacher_hidden_N_G, teacher_weight_V_G = _inputs()
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        kernel.divergence(*_inputs(), beta=1.5, temperature=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kernel.divergence(*_inputs(), beta=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="slice a padded head to the shared tokenizer vocabulary"):
        kernel.divergence(hidden_N_H, weight_V_H, teacher_hidden_N_G, teacher_weight_V_G[:-1], beta=0.5, temperature=1)
