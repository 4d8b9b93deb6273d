"""The chunked torch kernel: logprobs at ids without the [N, V] logits, on any torch device.

Forward streams over (vocabulary block, row chunk) tiles keeping a log-sum-exp per row and block
(combined at the end: the online log-sum-exp, kept per block so backward can rescale block
softmaxes) and the logits at the requested ids; it saves only hidden, weight, ids and those
log-sum-exps ([N, V / vocab_block], no [N, V]). Backward
recomputes each tile's softmax and applies ``dlogits = scatter_add(g at ids) − (Σ_k g_k)·p``, so
duplicate ids in a row add up. dW is accumulated per vocabulary block and written once; dh is
accumulated over blocks. The matmuls run in the inputs' dtype (bf16 tensor cores, AMX on CPU) and
everything after them in at least fp32, so bf16 inputs get fp32 log-sum-exps and accumulators.

``DISTILL_CHUNKED_COMPILE=1`` runs the per-tile bodies through ``torch.compile`` (fuses the
elementwise passes; pays a one-off compile of tens of seconds per process).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ChunkedKernel", "CHUNKED_KERNEL"]


def _forward_tile(
    hidden_C_H: torch.Tensor, weight_B_H: torch.Tensor, local_ids_C_K: torch.Tensor, acc_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp over this block [C], logits at the ids inside this block, else 0 [C, K]).

    The log-sum-exp comes from the fused softmax kernel (``lse = max − log p[argmax]``, with
    ``p[argmax] ≥ 1/B`` well conditioned): on CPU ``torch.logsumexp`` takes ~4× longer.
    """
    logits_C_B = hidden_C_H @ weight_B_H.T
    width = logits_C_B.shape[1]
    max_C, argmax_C = logits_C_B.max(dim=1)
    top_C = torch.softmax(logits_C_B, dim=1, dtype=acc_dtype).gather(1, argmax_C[:, None])[:, 0]
    inside_C_K = (local_ids_C_K >= 0) & (local_ids_C_K < width)
    picked_C_K = logits_C_B.gather(1, local_ids_C_K.clamp(0, width - 1)).to(acc_dtype)
    return max_C.to(acc_dtype) - torch.log(top_C), torch.where(inside_C_K, picked_C_K, 0.0)


def _dlogits_tile(
    hidden_C_H: torch.Tensor,
    weight_B_H: torch.Tensor,
    local_ids_C_K: torch.Tensor,
    block_lse_C: torch.Tensor,
    lse_C: torch.Tensor,
    grad_C_K: torch.Tensor,
) -> torch.Tensor:
    """``scatter_add(g at ids) − (Σ_k g_k)·p`` on one tile, in the matmul dtype.

    ``p = softmax(block) · exp(block_lse − lse)``: the fused block softmax rescaled to the row.
    """
    logits_C_B = hidden_C_H @ weight_B_H.T
    width = logits_C_B.shape[1]
    inside_C_K = (local_ids_C_K >= 0) & (local_ids_C_K < width)
    dlogits_C_B = torch.softmax(logits_C_B, dim=1, dtype=lse_C.dtype)
    dlogits_C_B.mul_((-grad_C_K.sum(1) * torch.exp(block_lse_C - lse_C))[:, None])
    dlogits_C_B.scatter_add_(1, local_ids_C_K.clamp(0, width - 1), torch.where(inside_C_K, grad_C_K, 0.0))
    return dlogits_C_B.to(hidden_C_H.dtype)


class ChunkedKernel:
    """``log_softmax(h @ W.T)`` at ``ids`` in tiles of ``row_chunk`` × ``vocab_block`` logits."""

    name = "chunked"

    def __init__(self, *, row_chunk: int = 2048, vocab_block: int = 4096, compile: bool = False) -> None:
        self.row_chunk = row_chunk
        self.vocab_block = vocab_block
        self.compile = compile
        self._bodies: tuple[Callable[..., Any], Callable[..., Any]] | None = None

    def bodies(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """The per-tile (forward, dlogits) functions, compiled on first use when asked to."""
        if self._bodies is None:
            if self.compile:
                self._bodies = (torch.compile(_forward_tile), torch.compile(_dlogits_tile))
            else:
                self._bodies = (_forward_tile, _dlogits_tile)
        return self._bodies

    def __call__(
        self, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, ids_N_K: torch.Tensor
    ) -> torch.Tensor:
        return _ChunkedLogprobs.apply(hidden_N_H, weight_V_H, ids_N_K, self)


def _tiles(size: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, size)) for start in range(0, size, step)]


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, ids_N_K: torch.Tensor, kernel: ChunkedKernel
    ) -> torch.Tensor:
        mm_dtype = torch.promote_types(hidden_N_H.dtype, weight_V_H.dtype)
        acc_dtype = torch.promote_types(mm_dtype, torch.float32)
        hidden_N_H, weight_V_H = hidden_N_H.to(mm_dtype), weight_V_H.to(mm_dtype)
        forward_tile, _ = kernel.bodies()
        num_rows, vocab = hidden_N_H.shape[0], weight_V_H.shape[0]
        picked_N_K = torch.zeros(ids_N_K.shape, dtype=acc_dtype, device=hidden_N_H.device)
        blocks = _tiles(vocab, kernel.vocab_block)
        block_lse_N_X = torch.empty((num_rows, len(blocks)), dtype=acc_dtype, device=hidden_N_H.device)
        for block, (v0, v1) in enumerate(blocks):
            weight_B_H = weight_V_H[v0:v1]
            for n0, n1 in _tiles(num_rows, kernel.row_chunk):
                block_lse_N_X[n0:n1, block], block_picked_C_K = forward_tile(
                    hidden_N_H[n0:n1], weight_B_H, ids_N_K[n0:n1] - v0, acc_dtype
                )
                picked_N_K[n0:n1] += block_picked_C_K
        lse_N = torch.logsumexp(block_lse_N_X, dim=1)
        ctx.save_for_backward(hidden_N_H, weight_V_H, ids_N_K, lse_N, block_lse_N_X)
        ctx.kernel = kernel
        return picked_N_K - lse_N[:, None]

    @staticmethod
    def backward(ctx: Any, grad_N_K: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden_N_H, weight_V_H, ids_N_K, lse_N, block_lse_N_X = ctx.saved_tensors
        kernel: ChunkedKernel = ctx.kernel
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc_dtype = lse_N.dtype
        # Rows whose upstream gradient is all zero (masked, clamped ratio) contribute nothing.
        active_A = (grad_N_K != 0).any(dim=1).nonzero().squeeze(1)
        if active_A.numel() == 0:
            dh_N_H = torch.zeros_like(hidden_N_H) if want_dh else None
            return dh_N_H, torch.zeros_like(weight_V_H) if want_dw else None, None, None
        everything = active_A.numel() == hidden_N_H.shape[0]
        hidden_A_H = hidden_N_H if everything else hidden_N_H[active_A]
        ids_A_K = ids_N_K if everything else ids_N_K[active_A]
        lse_A = lse_N if everything else lse_N[active_A]
        block_lse_A_X = block_lse_N_X if everything else block_lse_N_X[active_A]
        grad_A_K = (grad_N_K if everything else grad_N_K[active_A]).to(acc_dtype)
        dh_A_H = torch.zeros(hidden_A_H.shape, dtype=acc_dtype, device=hidden_A_H.device)
        dw_V_H = torch.empty_like(weight_V_H) if want_dw else None
        _, dlogits_tile = kernel.bodies()
        rows = _tiles(hidden_A_H.shape[0], kernel.row_chunk)
        for block, (v0, v1) in enumerate(_tiles(weight_V_H.shape[0], kernel.vocab_block)):
            weight_B_H = weight_V_H[v0:v1]
            # One row chunk: the matmul's own fp32 accumulation suffices, write the block in place.
            dw_B_H = dw_V_H[v0:v1] if len(rows) == 1 and want_dw else torch.zeros(
                weight_B_H.shape, dtype=acc_dtype, device=weight_B_H.device
            )
            for n0, n1 in rows:
                hidden_C_H = hidden_A_H[n0:n1]
                dlogits_C_B = dlogits_tile(
                    hidden_C_H, weight_B_H, ids_A_K[n0:n1] - v0, block_lse_A_X[n0:n1, block], lse_A[n0:n1],
                    grad_A_K[n0:n1],
                )
                if want_dh:
                    _accumulate(dh_A_H[n0:n1], dlogits_C_B, weight_B_H)
                if want_dw and len(rows) == 1:
                    torch.mm(dlogits_C_B.T, hidden_C_H, out=dw_B_H)
                elif want_dw:
                    _accumulate(dw_B_H, dlogits_C_B.T, hidden_C_H)
            if want_dw and len(rows) > 1:
                dw_V_H[v0:v1] = dw_B_H
        if not want_dh:
            return None, dw_V_H, None, None
        if everything:
            return dh_A_H.to(hidden_N_H.dtype), dw_V_H, None, None
        dh_N_H = torch.zeros(hidden_N_H.shape, dtype=hidden_N_H.dtype, device=hidden_N_H.device)
        dh_N_H[active_A] = dh_A_H.to(hidden_N_H.dtype)
        return dh_N_H, dw_V_H, None, None


def _accumulate(acc_X_Y: torch.Tensor, a_X_Z: torch.Tensor, b_Z_Y: torch.Tensor) -> None:
    """``acc += a @ b`` in place when the dtypes allow it (no temporary), else via the matmul dtype."""
    if acc_X_Y.dtype == a_X_Z.dtype:
        acc_X_Y.addmm_(a_X_Z, b_Z_Y)
    else:
        acc_X_Y += a_X_Z @ b_Z_Y


CHUNKED_KERNEL = ChunkedKernel(compile=os.environ.get("DISTILL_CHUNKED_COMPILE", "") == "1")
