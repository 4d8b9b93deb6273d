"""The Triton kernel: logprobs at ids from hidden states and the head weight, for CUDA tensors.

Forward: one program per block of rows streams over the vocabulary with an online log-sum-exp and
picks the logits at the ids as their block passes. Backward: one program per vocabulary block walks
all rows, recomputes each logits tile, forms ``g·(onehot − p)`` and adds ``dlogitsᵀ·h`` into its
own dW rows (no other program touches them, so no atomics and a deterministic dW) and
``dlogits·W`` into dh with atomics. Products use IEEE precision (no TF32) and accumulate in fp32
(fp64 for fp64 inputs). Importing this module imports triton; without a GPU the kernels run only
under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from distill.plugins.fused_losses.chunked import CHUNKED_KERNEL, ActiveRows

__all__ = ["TritonKernel", "TRITON_KERNEL"]


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr):
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        hcols = h0 + tl.arange(0, BLOCK_H)
        h_ok = hcols < H
        h_tile = tl.load(h_ptr + rows[:, None] * H + hcols[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w_tile = tl.load(w_ptr + cols[:, None] * H + hcols[None, :], mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(h_tile, tl.trans(w_tile), acc, input_precision="ieee", out_dtype=ACC)
    return acc


@triton.jit
def _forward_kernel(h_ptr, w_ptr, ids_ptr, lse_ptr, picked_ptr, N, V, H, K,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    running_max = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
    running_sum = tl.zeros([BLOCK_N], dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        logits = _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, BLOCK_N, BLOCK_V, BLOCK_H, ACC)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        for k in range(0, K):
            id_k = tl.load(ids_ptr + rows * K + k, mask=row_ok, other=-1)
            value = tl.sum(tl.where(cols[None, :] == id_k[:, None], logits, 0.0), axis=1)
            tl.store(picked_ptr + rows * K + k, value, mask=row_ok & (id_k >= v0) & (id_k < v0 + BLOCK_V))
    tl.store(lse_ptr + rows, running_max + tl.log(running_sum), mask=row_ok)


@triton.jit
def _backward_kernel(h_ptr, w_ptr, ids_ptr, lse_ptr, grad_ptr, dh_ptr, dw_ptr, N, V, H, K,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr):
    cols = (tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_ok = cols < V
    for n0 in range(0, N, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < N
        logits = _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, BLOCK_N, BLOCK_V, BLOCK_H, ACC)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        grad_sum = tl.zeros([BLOCK_N], dtype=ACC)
        onehot = tl.zeros([BLOCK_N, BLOCK_V], dtype=ACC)
        for k in range(0, K):
            id_k = tl.load(ids_ptr + rows * K + k, mask=row_ok, other=-1)
            grad_k = tl.load(grad_ptr + rows * K + k, mask=row_ok, other=0.0)
            grad_sum += grad_k
            onehot += tl.where(cols[None, :] == id_k[:, None], grad_k[:, None], 0.0)
        dlogits = onehot - grad_sum[:, None] * tl.exp(logits - lse[:, None])
        dlogits = tl.where(row_ok[:, None] & col_ok[None, :], dlogits, 0.0).to(h_ptr.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            hcols = h0 + tl.arange(0, BLOCK_H)
            h_ok = hcols < H
            h_tile = tl.load(h_ptr + rows[:, None] * H + hcols[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            w_tile = tl.load(w_ptr + cols[:, None] * H + hcols[None, :], mask=col_ok[:, None] & h_ok[None, :], other=0.0)
            dh_part = tl.dot(dlogits, w_tile, input_precision="ieee", out_dtype=ACC)
            tl.atomic_add(dh_ptr + rows[:, None] * H + hcols[None, :], dh_part, mask=row_ok[:, None] & h_ok[None, :])
            dw_ptrs = dw_ptr + cols[:, None] * H + hcols[None, :]
            dw_ok = col_ok[:, None] & h_ok[None, :]
            dw_part = tl.dot(tl.trans(dlogits), h_tile, input_precision="ieee", out_dtype=ACC)
            tl.store(dw_ptrs, tl.load(dw_ptrs, mask=dw_ok, other=0.0) + dw_part, mask=dw_ok)


class TritonKernel:
    """``log_softmax(h @ W.T)`` at ``ids`` with Triton; tiles of ``block_n`` × ``block_v`` logits."""

    name = "triton"

    def __init__(self, *, block_n: int = 64, block_v: int = 128, block_h: int = 64) -> None:
        self.block_n, self.block_v, self.block_h = block_n, block_v, block_h

    def __call__(
        self, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, ids_N_K: torch.Tensor
    ) -> torch.Tensor:
        return _TritonLogprobs.apply(hidden_N_H, weight_V_H, ids_N_K, self)

    def divergence(self, *args: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
        """The full-vocabulary divergence has no Triton version yet: the chunked torch kernel runs
        it, on the same device."""
        return CHUNKED_KERNEL.divergence(*args, beta=beta, temperature=temperature)


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, Any]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


class _TritonLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, ids_N_K: torch.Tensor, kernel: TritonKernel
    ) -> torch.Tensor:
        dtype = torch.promote_types(hidden_N_H.dtype, weight_V_H.dtype)
        hidden_N_H = hidden_N_H.to(dtype).contiguous()
        weight_V_H = weight_V_H.to(dtype).contiguous()
        ids_N_K = ids_N_K.contiguous()
        (num_rows, width), (vocab, k) = hidden_N_H.shape, (weight_V_H.shape[0], ids_N_K.shape[1])
        acc_torch, acc_triton = _acc(dtype)
        lse_N = torch.empty(num_rows, dtype=acc_torch, device=hidden_N_H.device)
        picked_N_K = torch.empty(ids_N_K.shape, dtype=acc_torch, device=hidden_N_H.device)
        grid = (triton.cdiv(num_rows, kernel.block_n),)
        _forward_kernel[grid](
            hidden_N_H, weight_V_H, ids_N_K, lse_N, picked_N_K, num_rows, vocab, width, k,
            BLOCK_N=kernel.block_n, BLOCK_V=kernel.block_v, BLOCK_H=kernel.block_h, ACC=acc_triton,
        )
        ctx.save_for_backward(hidden_N_H, weight_V_H, ids_N_K, lse_N)
        ctx.kernel = kernel
        return picked_N_K - lse_N[:, None]

    @staticmethod
    def backward(ctx: Any, grad_N_K: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden_N_H, weight_V_H, ids_N_K, lse_N = ctx.saved_tensors
        kernel: TritonKernel = ctx.kernel
        acc_torch, acc_triton = _acc(hidden_N_H.dtype)
        rows = ActiveRows(grad_N_K)
        dh_A_H = torch.zeros((rows.count, hidden_N_H.shape[1]), dtype=acc_torch, device=hidden_N_H.device)
        dw_V_H = torch.zeros(weight_V_H.shape, dtype=acc_torch, device=weight_V_H.device)
        if rows.count > 0:
            (vocab, width), k = weight_V_H.shape, ids_N_K.shape[1]
            grid = (triton.cdiv(vocab, kernel.block_v),)
            _backward_kernel[grid](
                rows.take(hidden_N_H).contiguous(), weight_V_H, rows.take(ids_N_K).contiguous(),
                rows.take(lse_N).contiguous(), rows.take(grad_N_K).to(acc_torch).contiguous(), dh_A_H, dw_V_H,
                rows.count, vocab, width, k,
                BLOCK_N=kernel.block_n, BLOCK_V=kernel.block_v, BLOCK_H=kernel.block_h, ACC=acc_triton,
            )
        dh = rows.scatter(dh_A_H, hidden_N_H.dtype) if ctx.needs_input_grad[0] else None
        dw = dw_V_H.to(weight_V_H.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None


TRITON_KERNEL = TritonKernel()
