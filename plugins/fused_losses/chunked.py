"""The chunked torch kernel: logprobs at ids without the [N, V] logits, on any torch device.

Forward walks (vocabulary block, row chunk) tiles keeping a log-sum-exp per row and block
(combined at the end: the online log-sum-exp, kept per block so backward can rescale block
softmaxes) and the logits at the requested ids; it saves only hidden, weight, ids and those
log-sum-exps ([N, V / vocab_block], no [N, V]). Backward recomputes each tile's softmax and applies
``dlogits = scatter_add(g at ids) − (Σ_k g_k)·p``, so duplicate ids in a row add up. dW is
accumulated per vocabulary block and written once; dh is accumulated over blocks.

Speed comes from the tile size, not from fusion: the default 2048 × 2048 tile (8 MiB in bf16) stays
in cache between its matmul and the softmax that reads it, so eager elementwise work is almost
free and the kernel runs at about the cost of its four matmuls (measured on CPU: a
``torch.compile``d per-tile body was no faster, and 4096 × 2048 tiles were ~20% slower). Tiles live
in buffers allocated once per pass (``out=``, softmax in place): a fresh allocation per tile
page-faults its memory in every time, which cost ~25% on CPU. The matmuls run in the inputs' dtype;
forward's softmax (for the log-sum-exps), the log-sum-exps and the accumulators are at least fp32;
backward's softmax becomes ``dlogits`` in the inputs' dtype, the dtype its matmuls take anyway.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CHUNKED_KERNEL", "ChunkedKernel"]


def _forward_tile(
    logits_C_B: torch.Tensor, local_ids_C_K: torch.Tensor, probs_C_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp over this block [C], logits at the ids inside this block, else 0 [C, K]).

    The log-sum-exp comes from the fused softmax kernel (``lse = max − log p[argmax]``, with
    ``p[argmax] ≥ 1/B`` well conditioned), written into ``probs`` (at least fp32): on CPU
    ``torch.logsumexp`` takes ~4× longer.
    """
    width = logits_C_B.shape[1]
    top_C, argmax_C = torch.softmax(logits_C_B, dim=1, dtype=probs_C_B.dtype, out=probs_C_B).max(dim=1)
    max_C = logits_C_B.gather(1, argmax_C[:, None])[:, 0].to(probs_C_B.dtype)
    inside_C_K = (local_ids_C_K >= 0) & (local_ids_C_K < width)
    picked_C_K = logits_C_B.gather(1, local_ids_C_K.clamp(0, width - 1)).to(probs_C_B.dtype)
    return max_C - torch.log(top_C), torch.where(inside_C_K, picked_C_K, 0.0)


def _dlogits_tile(
    logits_C_B: torch.Tensor, local_ids_C_K: torch.Tensor, scale_C: torch.Tensor, grad_C_K: torch.Tensor
) -> torch.Tensor:
    """``scatter_add(g at ids) + scale·softmax(block)``, written over the logits.

    ``scale = −(Σ_k g_k)·exp(block_lse − lse)`` turns the block softmax into the row's ``−(Σ g)·p``.
    """
    width = logits_C_B.shape[1]
    inside_C_K = (local_ids_C_K >= 0) & (local_ids_C_K < width)
    dlogits_C_B = torch.softmax(logits_C_B, dim=1, out=logits_C_B).mul_(scale_C[:, None].to(logits_C_B.dtype))
    picked_grad_C_K = torch.where(inside_C_K, grad_C_K, 0.0).to(logits_C_B.dtype)
    return dlogits_C_B.scatter_add_(1, local_ids_C_K.clamp(0, width - 1), picked_grad_C_K)


class ChunkedKernel:
    """``log_softmax(h @ W.T)`` at ``ids`` in tiles of ``row_chunk`` × ``vocab_block`` logits."""

    name = "chunked"

    def __init__(self, *, row_chunk: int = 2048, vocab_block: int = 2048) -> None:
        self.row_chunk = row_chunk
        self.vocab_block = vocab_block

    def __call__(
        self, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, ids_N_K: torch.Tensor
    ) -> torch.Tensor:
        return _ChunkedLogprobs.apply(hidden_N_H, weight_V_H, ids_N_K, self)


def _tiles(size: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def _view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] tile at the start of a flat buffer (a matmul's ``out=``)."""
    return buffer[: rows * cols].view(rows, cols)


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, ids_N_K: torch.Tensor, kernel: ChunkedKernel
    ) -> torch.Tensor:
        mm_dtype = torch.promote_types(hidden_N_H.dtype, weight_V_H.dtype)
        acc_dtype = torch.promote_types(mm_dtype, torch.float32)
        hidden_N_H, weight_V_H = hidden_N_H.to(mm_dtype), weight_V_H.to(mm_dtype)
        num_rows, vocab = hidden_N_H.shape[0], weight_V_H.shape[0]
        picked_N_K = torch.zeros(ids_N_K.shape, dtype=acc_dtype, device=hidden_N_H.device)
        blocks = _tiles(vocab, kernel.vocab_block)
        block_lse_N_X = torch.empty((num_rows, len(blocks)), dtype=acc_dtype, device=hidden_N_H.device)
        tile = min(num_rows, kernel.row_chunk) * min(vocab, kernel.vocab_block)
        logits_buffer, probs_buffer = (
            torch.empty(tile, dtype=dtype, device=hidden_N_H.device) for dtype in (mm_dtype, acc_dtype)
        )
        for block, (v0, v1) in enumerate(blocks):
            weight_B_H = weight_V_H[v0:v1]
            for n0, n1 in _tiles(num_rows, kernel.row_chunk):
                logits_C_B = torch.mm(hidden_N_H[n0:n1], weight_B_H.T, out=_view(logits_buffer, n1 - n0, v1 - v0))
                block_lse_N_X[n0:n1, block], block_picked_C_K = _forward_tile(
                    logits_C_B, ids_N_K[n0:n1] - v0, _view(probs_buffer, n1 - n0, v1 - v0)
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
        grad_A_K = (grad_N_K if everything else grad_N_K[active_A]).to(acc_dtype)
        # Per block: the factor that turns its softmax into the row's −(Σ g)·p.
        scale_A_X = (block_lse_N_X - lse_N[:, None]).exp_().mul_(-grad_N_K.to(acc_dtype).sum(1, keepdim=True))
        scale_A_X = scale_A_X if everything else scale_A_X[active_A]
        dh_A_H = torch.zeros(hidden_A_H.shape, dtype=acc_dtype, device=hidden_A_H.device)
        dw_V_H = torch.empty_like(weight_V_H) if want_dw else None
        rows = _tiles(hidden_A_H.shape[0], kernel.row_chunk)
        hidden_size, device = hidden_A_H.shape[1], hidden_A_H.device
        chunk = min(hidden_A_H.shape[0], kernel.row_chunk)
        block = min(weight_V_H.shape[0], kernel.vocab_block)
        logits_buffer = torch.empty(chunk * block, dtype=hidden_A_H.dtype, device=device)
        product_buffer = torch.empty(max(chunk, block) * hidden_size, dtype=hidden_A_H.dtype, device=device)
        for block, (v0, v1) in enumerate(_tiles(weight_V_H.shape[0], kernel.vocab_block)):
            weight_B_H = weight_V_H[v0:v1]
            # One row chunk: the matmul's own fp32 accumulation suffices, write the block in place.
            dw_B_H = dw_V_H[v0:v1] if len(rows) == 1 and want_dw else torch.zeros(
                weight_B_H.shape, dtype=acc_dtype, device=device
            )
            for n0, n1 in rows:
                hidden_C_H = hidden_A_H[n0:n1]
                logits_C_B = torch.mm(hidden_C_H, weight_B_H.T, out=_view(logits_buffer, n1 - n0, v1 - v0))
                dlogits_C_B = _dlogits_tile(logits_C_B, ids_A_K[n0:n1] - v0, scale_A_X[n0:n1, block], grad_A_K[n0:n1])
                if want_dh:
                    _accumulate(dh_A_H[n0:n1], dlogits_C_B, weight_B_H, product_buffer)
                if want_dw and len(rows) == 1:
                    torch.mm(dlogits_C_B.T, hidden_C_H, out=dw_B_H)
                elif want_dw:
                    _accumulate(dw_B_H, dlogits_C_B.T, hidden_C_H, product_buffer)
            if want_dw and len(rows) > 1:
                dw_V_H[v0:v1] = dw_B_H
        if not want_dh:
            return None, dw_V_H, None, None
        if everything:
            return dh_A_H.to(hidden_N_H.dtype), dw_V_H, None, None
        dh_N_H = torch.zeros(hidden_N_H.shape, dtype=hidden_N_H.dtype, device=hidden_N_H.device)
        dh_N_H[active_A] = dh_A_H.to(hidden_N_H.dtype)
        return dh_N_H, dw_V_H, None, None


def _accumulate(acc_X_Y: torch.Tensor, a_X_Z: torch.Tensor, b_Z_Y: torch.Tensor, buffer: torch.Tensor) -> None:
    """``acc += a @ b`` in place when the dtypes allow it, else through ``buffer`` in the matmul dtype."""
    if acc_X_Y.dtype == a_X_Z.dtype:
        acc_X_Y.addmm_(a_X_Z, b_Z_Y)
    else:
        acc_X_Y += torch.mm(a_X_Z, b_Z_Y, out=_view(buffer, *acc_X_Y.shape))


CHUNKED_KERNEL = ChunkedKernel()
