"""The chunked torch kernel: logprobs at ids, or a full-vocabulary divergence, without the [N, V] logits.

Logprobs. Forward walks (vocabulary block, row chunk) tiles keeping a log-sum-exp per row and block
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

Divergence (``ChunkedKernel.divergence``, the objectives ``full_reverse_kl``, ``full_forward_kl`` and
``generalized_jsd``). With ``z = h·Wᵀ/T`` (student), ``y = g·Uᵀ/T`` (teacher, a constant),
``s = log_softmax(z)``, ``t = log_softmax(y)``, ``p = e^s``, ``q = e^t``, per row::

    reverse KL (β = 1)  D = Σ p(s − t) = Σ p(z − y) − lse(z) + lse(y)
                        ∂D/∂z_i = p_i·((s_i − t_i) − D)
    forward KL (β = 0)  D = Σ q(t − s) = Σ q(y − z) − lse(y) + lse(z)
                        ∂D/∂z_i = p_i − q_i
    JSD (0 < β < 1)     D = β·Σ q(t − m) + (1 − β)·Σ p(s − m),  m = log((1 − β)·p + β·q)
                        ∂D/∂z_i = (1 − β)·p_i·((s_i − m_i) − K),  K = Σ p(s − m)

from ``∂p_j/∂z_i = p_j·(δ_ij − p_i)``; in the JSD the terms through m cancel, because
``Σ e^m·∂m = (1 − β)·Σ ∂p = 0``. The gradient of the logits ``h·Wᵀ`` is ``grad_n·∂D/∂z / T``. A KL
needs one pass: its Σ p(z − y) is kept per block like the log-sum-exps and rescaled by
``e^(lse_block − lse)`` at the end. The JSD's m needs both log-sum-exps first, so its forward makes
a second pass. Saved: the inputs and [N] statistics (both log-sum-exps, and D for the reverse KL or
K for the JSD); backward recomputes both models' tiles. So a KL costs six matmuls of the logits'
size and the JSD eight (measured on CPU: 8.4 with everything else), where a kernel that keeps the
logits needs four. Each tile is converted to fp32 once, scaled by 1/T (all elementwise work is
fp32), and the block log-sum-exps come from ``max + log Σ exp(z − max)``, which measured 2× faster
on a CPU without AMX than softmax + ``max`` with its indices.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """``log_softmax(h @ W.T)`` at ``ids``, or a divergence from a teacher, in tiles of ``row_chunk`` ×
    ``vocab_block`` logits."""

    name = "chunked"

    def __init__(self, *, row_chunk: int = 2048, vocab_block: int = 2048) -> None:
        self.row_chunk = row_chunk
        self.vocab_block = vocab_block

    def __call__(
        self, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, ids_N_K: torch.Tensor
    ) -> torch.Tensor:
        return _ChunkedLogprobs.apply(hidden_N_H, weight_V_H, ids_N_K, self)

    def divergence(
        self,
        hidden_N_H: torch.Tensor,
        weight_V_H: torch.Tensor,
        teacher_hidden_N_G: torch.Tensor,
        teacher_weight_V_G: torch.Tensor,
        *,
        beta: float,
        temperature: float,
    ) -> torch.Tensor:
        """Per-row ``D_N`` of the reference kernel's ``divergence`` (TRL's generalised JSD: ``beta = 0``
        forward KL, ``beta = 1`` reverse KL), in tiles; gradients reach h and W only."""
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if hidden_N_H.shape[0] != teacher_hidden_N_G.shape[0] or weight_V_H.shape[0] != teacher_weight_V_G.shape[0]:
            raise ValueError(
                f"student and teacher must have the same rows and vocabulary, got hidden {tuple(hidden_N_H.shape)}, "
                f"head {tuple(weight_V_H.shape)} against teacher hidden {tuple(teacher_hidden_N_G.shape)}, head "
                f"{tuple(teacher_weight_V_G.shape)}; slice a padded head to the shared tokenizer vocabulary"
            )
        return _ChunkedDivergence.apply(
            hidden_N_H, weight_V_H, teacher_hidden_N_G.detach(), teacher_weight_V_G.detach(), beta, temperature, self
        )


class ActiveRows:
    """The rows whose upstream gradient is not all zero (masked tokens, a clamped importance ratio).

    Backward skips the others: they contribute nothing, and their dh is exactly zero.
    """

    def __init__(self, grad_N_K: torch.Tensor) -> None:
        self.index_A = (grad_N_K != 0).any(dim=1).nonzero().squeeze(1)
        self.count = self.index_A.numel()
        self.num_rows = grad_N_K.shape[0]
        self.everything = self.count == self.num_rows

    def take(self, tensor_N_X: torch.Tensor) -> torch.Tensor:
        """The active rows of ``tensor`` (the tensor itself when every row is)."""
        return tensor_N_X if self.everything else tensor_N_X[self.index_A]

    def scatter(self, tensor_A_X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` back at its rows of N, in ``dtype``, zero on the inactive rows."""
        if self.everything:
            return tensor_A_X.to(dtype)
        tensor_N_X = torch.zeros((self.num_rows, *tensor_A_X.shape[1:]), dtype=dtype, device=tensor_A_X.device)
        tensor_N_X[self.index_A] = tensor_A_X.to(dtype)
        return tensor_N_X


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
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = ActiveRows(grad_N_K)
        if rows.count == 0:
            return _zero_grads(hidden_N_H, weight_V_H, want_dh, want_dw) + (None, None)
        ids_A_K = rows.take(ids_N_K)
        grad_A_K = rows.take(grad_N_K).to(lse_N.dtype)
        # Per block: the factor that turns its softmax into the row's −(Σ g)·p.
        scale_A_X = (rows.take(block_lse_N_X) - rows.take(lse_N)[:, None]).exp_().mul_(-grad_A_K.sum(1, keepdim=True))

        def dlogits_tile(logits_C_B: torch.Tensor, block: int, v0: int, n0: int, n1: int) -> torch.Tensor:
            return _dlogits_tile(logits_C_B, ids_A_K[n0:n1] - v0, scale_A_X[n0:n1, block], grad_A_K[n0:n1])

        dh_A_H, dw_V_H = _head_gradients(rows.take(hidden_N_H), weight_V_H, ctx.kernel, want_dh, want_dw, dlogits_tile)
        return (rows.scatter(dh_A_H, hidden_N_H.dtype) if want_dh else None), dw_V_H, None, None


def _zero_grads(
    hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, want_dh: bool, want_dw: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (torch.zeros_like(hidden_N_H) if want_dh else None), (torch.zeros_like(weight_V_H) if want_dw else None)


def _head_gradients(
    hidden_A_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    kernel: ChunkedKernel,
    want_dh: bool,
    want_dw: bool,
    dlogits_tile: Callable[[torch.Tensor, int, int, int, int], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dh at least fp32, dW) through logits tiles recomputed block by block, row chunk by row chunk.

    ``dlogits_tile(logits_C_B, block, v0, n0, n1)`` turns a tile of logits, in a buffer of the matmul
    dtype that it may overwrite, into that tile's dlogits in the matmul dtype. dh is accumulated over
    blocks; each dW block is accumulated over row chunks and written once.
    """
    acc_dtype = torch.promote_types(hidden_A_H.dtype, torch.float32)
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
            dlogits_C_B = dlogits_tile(logits_C_B, block, v0, n0, n1)
            if want_dh:
                _accumulate(dh_A_H[n0:n1], dlogits_C_B, weight_B_H, product_buffer)
            if want_dw and len(rows) == 1:
                torch.mm(dlogits_C_B.T, hidden_C_H, out=dw_B_H)
            elif want_dw:
                _accumulate(dw_B_H, dlogits_C_B.T, hidden_C_H, product_buffer)
        if want_dw and len(rows) > 1:
            dw_V_H[v0:v1] = dw_B_H
    return dh_A_H, dw_V_H


def _accumulate(acc_X_Y: torch.Tensor, a_X_Z: torch.Tensor, b_Z_Y: torch.Tensor, buffer: torch.Tensor) -> None:
    """``acc += a @ b`` in place when the dtypes allow it, else through ``buffer`` in the matmul dtype."""
    if acc_X_Y.dtype == a_X_Z.dtype:
        acc_X_Y.addmm_(a_X_Z, b_Z_Y)
    else:
        acc_X_Y += torch.mm(a_X_Z, b_Z_Y, out=_view(buffer, *acc_X_Y.shape))


# -- divergence ------------------------------------------------------------------------------------


class _Buffers:
    """Flat tile buffers, each allocated on first use and reused by every tile of one pass."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = size, device
        self._flat: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
        if name not in self._flat:
            self._flat[name] = torch.empty(self.size, dtype=dtype, device=self.device)
        return _view(self._flat[name], rows, cols)


def _block_lse(logits_C_B: torch.Tensor, exps_C_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp over this block, Σ exps) [C] each; leaves ``exp(logits − block max)`` in ``exps``."""
    max_C = logits_C_B.amax(dim=1)
    sum_C = torch.sub(logits_C_B, max_C[:, None], out=exps_C_B).exp_().sum(dim=1)
    return sum_C.log().add_(max_C), sum_C


def _log_mixture(p_C_B: torch.Tensor, q_C_B: torch.Tensor, beta: float, out_C_B: torch.Tensor) -> torch.Tensor:
    """``log((1 − β)·p + β·q)`` into ``out`` (which may be ``q``).

    Floored at the smallest normal number: where p and q both underflow their terms must vanish,
    not become ``0·∞``.
    """
    mixture_C_B = torch.mul(q_C_B, beta, out=out_C_B).add_(p_C_B, alpha=1 - beta)
    return mixture_C_B.clamp_min_(torch.finfo(mixture_C_B.dtype).tiny).log_()


def _rowdot(a_C_B: torch.Tensor, b_C_B: torch.Tensor) -> torch.Tensor:
    """``Σ a·b`` per row [C], overwriting ``a``."""
    return a_C_B.mul_(b_C_B).sum(dim=1)


class _DivergenceTiles:
    """Tiles of one pass: both models' logits scaled by 1/T in the accumulator dtype, and spare tiles."""

    def __init__(
        self, kernel: ChunkedKernel, num_rows: int, vocab: int, acc_dtype: torch.dtype, temperature: float,
        device: torch.device,
    ) -> None:
        self.rows = _tiles(num_rows, kernel.row_chunk)
        self.blocks = _tiles(vocab, kernel.vocab_block)
        self.acc_dtype, self.temperature = acc_dtype, temperature
        self._buffers = _Buffers(min(num_rows, kernel.row_chunk) * min(vocab, kernel.vocab_block), device)

    def spare(self, name: str, like_C_B: torch.Tensor) -> torch.Tensor:
        return self._buffers(name, self.acc_dtype, *like_C_B.shape)

    def logits(self, name: str, inputs_C_X: torch.Tensor, weight_B_X: torch.Tensor) -> torch.Tensor:
        """``inputs @ weight.T / T``: the matmul in the inputs' dtype, the result in the accumulator's."""
        raw_buffer_C_B = self._buffers(f"{name}_raw", inputs_C_X.dtype, inputs_C_X.shape[0], weight_B_X.shape[0])
        return self.scaled(name, torch.mm(inputs_C_X, weight_B_X.T, out=raw_buffer_C_B))

    def scaled(self, name: str, raw_C_B: torch.Tensor) -> torch.Tensor:
        """``raw / T`` in the accumulator dtype: in place when ``raw`` is already in it."""
        logits_C_B = raw_C_B if raw_C_B.dtype == self.acc_dtype else self.spare(name, raw_C_B).copy_(raw_C_B)
        return logits_C_B if self.temperature == 1 else logits_C_B.div_(self.temperature)


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden_N_H: torch.Tensor,
        weight_V_H: torch.Tensor,
        teacher_hidden_N_G: torch.Tensor,
        teacher_weight_V_G: torch.Tensor,
        beta: float,
        temperature: float,
        kernel: ChunkedKernel,
    ) -> torch.Tensor:
        student_dtype = torch.promote_types(hidden_N_H.dtype, weight_V_H.dtype)
        teacher_dtype = torch.promote_types(teacher_hidden_N_G.dtype, teacher_weight_V_G.dtype)
        acc_dtype = torch.promote_types(torch.promote_types(student_dtype, teacher_dtype), torch.float32)
        hidden_N_H, weight_V_H = hidden_N_H.to(student_dtype), weight_V_H.to(student_dtype)
        teacher_hidden_N_G = teacher_hidden_N_G.to(teacher_dtype)
        teacher_weight_V_G = teacher_weight_V_G.to(teacher_dtype)
        num_rows, device = hidden_N_H.shape[0], hidden_N_H.device
        tiles = _DivergenceTiles(kernel, num_rows, weight_V_H.shape[0], acc_dtype, temperature, device)
        # Per block: the student's and the teacher's log-sum-exps, and a KL's Σ softmax_block(left)·(left − right).
        stats_3_N_X = torch.empty((3, num_rows, len(tiles.blocks)), dtype=acc_dtype, device=device)
        kl, left = beta in (0, 1), 1 if beta == 0 else 0  # the KL's left side: 0 student, 1 teacher
        for block, (v0, v1) in enumerate(tiles.blocks):
            for n0, n1 in tiles.rows:
                logits = (
                    tiles.logits("student", hidden_N_H[n0:n1], weight_V_H[v0:v1]),
                    tiles.logits("teacher", teacher_hidden_N_G[n0:n1], teacher_weight_V_G[v0:v1]),
                )
                exps_C_B = tiles.spare("p", logits[0])
                for side in (1 - left, left):  # the left side last: its exps stay for the KL
                    stats_3_N_X[side, n0:n1, block], sums_C = _block_lse(logits[side], exps_C_B)
                if kl:
                    difference_C_B = logits[left].sub_(logits[1 - left])
                    stats_3_N_X[2, n0:n1, block] = _rowdot(exps_C_B, difference_C_B).div_(sums_C)
        lse_2_N = torch.logsumexp(stats_3_N_X[:2], dim=2)
        if kl:
            cross_N = ((stats_3_N_X[left] - lse_2_N[left, :, None]).exp_() * stats_3_N_X[2]).sum(dim=1)
            divergence_N = cross_N - lse_2_N[left] + lse_2_N[1 - left]
            shift_N = divergence_N if beta == 1 else None
        else:
            kl_2_N = _jsd_pass(tiles, hidden_N_H, weight_V_H, teacher_hidden_N_G, teacher_weight_V_G, lse_2_N, beta)
            divergence_N = beta * kl_2_N[1] + (1 - beta) * kl_2_N[0]
            shift_N = kl_2_N[0]
        ctx.save_for_backward(hidden_N_H, weight_V_H, teacher_hidden_N_G, teacher_weight_V_G, *lse_2_N, shift_N)
        ctx.beta, ctx.temperature, ctx.kernel = beta, temperature, kernel
        return divergence_N

    @staticmethod
    def backward(ctx: Any, grad_N: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden_N_H, weight_V_H, teacher_hidden_N_G, teacher_weight_V_G, student_lse_N, teacher_lse_N, shift_N = (
            ctx.saved_tensors
        )
        beta, temperature, kernel = ctx.beta, ctx.temperature, ctx.kernel
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = ActiveRows(grad_N[:, None])
        if rows.count == 0:
            return _zero_grads(hidden_N_H, weight_V_H, want_dh, want_dw) + (None,) * 5
        # From ∂D/∂z to the gradient of the logits h·Wᵀ: grad_n / T, and the JSD's (1 − β).
        acc_dtype = student_lse_N.dtype
        scale_A = rows.take(grad_N).to(acc_dtype) * ((1 if beta in (0, 1) else 1 - beta) / temperature)
        teacher_hidden_A_G = rows.take(teacher_hidden_N_G)
        student_lse_A, teacher_lse_A = rows.take(student_lse_N), rows.take(teacher_lse_N)
        shift_A = None if shift_N is None else rows.take(shift_N)
        tiles = _DivergenceTiles(kernel, rows.count, weight_V_H.shape[0], acc_dtype, temperature, hidden_N_H.device)

        def dlogits_tile(logits_C_B: torch.Tensor, block: int, v0: int, n0: int, n1: int) -> torch.Tensor:
            student_C_B = tiles.scaled("student", logits_C_B)
            teacher_weight_B_G = teacher_weight_V_G[v0 : v0 + logits_C_B.shape[1]]
            teacher_C_B = tiles.logits("teacher", teacher_hidden_A_G[n0:n1], teacher_weight_B_G)
            s_C_B = student_C_B.sub_(student_lse_A[n0:n1, None])
            t_C_B = teacher_C_B.sub_(teacher_lse_A[n0:n1, None])
            dz_C_B = _divergence_dz(beta, s_C_B, t_C_B, None if shift_A is None else shift_A[n0:n1], tiles)
            return torch.mul(dz_C_B, scale_A[n0:n1, None], out=logits_C_B)

        dh_A_H, dw_V_H = _head_gradients(rows.take(hidden_N_H), weight_V_H, kernel, want_dh, want_dw, dlogits_tile)
        return (rows.scatter(dh_A_H, hidden_N_H.dtype) if want_dh else None), dw_V_H, *(None,) * 5


def _jsd_pass(
    tiles: _DivergenceTiles,
    hidden_N_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    teacher_hidden_N_G: torch.Tensor,
    teacher_weight_V_G: torch.Tensor,
    lse_2_N: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The JSD's second pass, now that both log-sum-exps are known: ``Σ p(s − m)`` and ``Σ q(t − m)`` [2, N]."""
    kl_2_N = torch.zeros(lse_2_N.shape, dtype=lse_2_N.dtype, device=lse_2_N.device)
    for v0, v1 in tiles.blocks:
        for n0, n1 in tiles.rows:
            s_C_B = tiles.logits("student", hidden_N_H[n0:n1], weight_V_H[v0:v1]).sub_(lse_2_N[0, n0:n1, None])
            t_C_B = tiles.logits("teacher", teacher_hidden_N_G[n0:n1], teacher_weight_V_G[v0:v1])
            t_C_B.sub_(lse_2_N[1, n0:n1, None])
            p_C_B = torch.exp(s_C_B, out=tiles.spare("p", s_C_B))
            q_C_B = torch.exp(t_C_B, out=tiles.spare("q", t_C_B))
            m_C_B = _log_mixture(p_C_B, q_C_B, beta, tiles.spare("mixture", s_C_B))
            kl_2_N[0, n0:n1] += _rowdot(p_C_B, s_C_B.sub_(m_C_B))
            kl_2_N[1, n0:n1] += _rowdot(q_C_B, t_C_B.sub_(m_C_B))
    return kl_2_N


def _divergence_dz(
    beta: float, s_C_B: torch.Tensor, t_C_B: torch.Tensor, shift_C: torch.Tensor | None, tiles: _DivergenceTiles
) -> torch.Tensor:
    """∂D/∂z over a tile (the module docstring's table) from both log-softmaxes, overwriting them.

    ``shift`` is ``D`` for the reverse KL (it enters as ``s − t − D``) and ``K = Σ p(s − m)`` for the JSD.
    """
    p_C_B = torch.exp(s_C_B, out=tiles.spare("p", s_C_B))
    if beta == 0:
        return p_C_B.sub_(t_C_B.exp_())
    if beta == 1:
        return s_C_B.sub_(t_C_B).sub_(shift_C[:, None]).mul_(p_C_B)
    m_C_B = _log_mixture(p_C_B, t_C_B.exp_(), beta, t_C_B)
    return s_C_B.sub_(m_C_B).sub_(shift_C[:, None]).mul_(p_C_B)


CHUNKED_KERNEL = ChunkedKernel()
