"""Benchmark of LM-head loss implementations: incremental peak memory and time of forward + backward.

    python bench/losses.py --device cpu      # writes bench/results/losses-cpu.json and .txt, prints ratios
    python bench/losses.py --device cuda
    python bench/losses.py --loss jsd --device cpu --rounds 2   # writes bench/results/losses-jsd-cpu.*

Every (implementation, shape) runs in its own process, so one implementation's allocator caches
and compiled graphs never touch another's; the processes are interleaved (A B C, A B C per shape).
Time: the median of ``--iters`` forward + backward passes after ``--warmup`` passes (compilation
happens in the warm-up). Memory: the peak above the level just before a pass, with the inputs, the
previous pass's gradients freed; it includes the gradients the pass creates (dh, dW). On CUDA that
is ``max_memory_allocated``; on CPU torch keeps no allocation statistics and tracemalloc does not
see its allocations, so a thread samples the process RSS every millisecond during one extra pass
made after ``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` and ``malloc_trim``: every large tensor is then
its own mmap, returned to the OS when freed, so RSS follows the live tensors (the timed passes
keep glibc's default allocator behaviour).
``--rounds R`` repeats the whole interleaved sequence R times and reports each implementation's
median over rounds (every round is kept in the JSON). Each row also records the loss value of its
last timed pass, so implementations can be checked to compute the same quantity (at a small fp32
shape first: ``--shapes 64,64,1000 --dtype float32``).

Losses: ``sampled_reverse_kl`` (default), the importance-sampled reverse KL of ``sampled_reverse_kl``
(one id per row); ``jsd``, the full-vocabulary divergence from a local teacher whose hidden size
equals the student's (TRL's generalised JSD; ``--beta``, one or several, 0 = forward KL, 1 = reverse
KL; ``--temperature``), averaged over rows: ``naive`` materialises both models' logits (the matmuls
in the inputs' dtype, the rest fp32), ``chunked`` is ``ChunkedKernel.divergence``, ``liger_jsd`` is
Liger's chunked ``LigerFusedLinearJSDLoss`` (its beta and temperature mean the same as TRL's).

Peers run from ``--peer-python`` (a venv holding them, e.g. made with ``--system-site-packages`` and
``pip install --no-deps cut-cross-entropy liger-kernel``): Cut Cross-Entropy's ``torch_compile``
implementation (a cross-entropy, the same LSE + gather work) and Liger's chunked GRPO and JSD losses
(pure torch, so they run on CPU; its Triton losses need a GPU).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    ("sampled_reverse_kl", "cpu"): [(4096, 1024, 32768), (2048, 1024, 151936)],
    ("sampled_reverse_kl", "cuda"): [(4096, 4096, 128256), (16384, 4096, 128256), (8192, 4096, 151936)],
    ("jsd", "cpu"): [(1024, 1024, 151936)],
    ("jsd", "cuda"): [(8192, 4096, 151936)],
}
IMPLS = {
    "sampled_reverse_kl": ["naive", "naive_compiled", "chunked", "cce_torch_compile", "liger_grpo"],
    "jsd": ["naive", "chunked", "liger_jsd"],
}
PEERS = {"cce_torch_compile": "cut-cross-entropy", "liger_grpo": "liger-kernel", "liger_jsd": "liger-kernel"}
LIGER_SEQUENCE = 512  # tokens per sequence when the N rows are handed to Liger as [N / 512, 512]
BASELINE = "naive"
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


# -- the worker: one implementation at one shape -----------------------------------------------


def _is_loss(logprobs_N, sampling_N, advantage_N, cap=20.0):
    import torch

    ratio_N = torch.exp((logprobs_N - sampling_N).clamp(-cap, cap))
    return -(ratio_N * advantage_N).sum()


def _naive(hidden_N_H, weight_V_H, ids_N, sampling_N, advantage_N):
    import torch

    logits_N_V = (hidden_N_H @ weight_V_H.T).float()
    logprobs_N = torch.log_softmax(logits_N_V, dim=-1).gather(1, ids_N[:, None])[:, 0]
    return _is_loss(logprobs_N, sampling_N, advantage_N)


def _build(impl: str) -> Callable[..., Any]:
    import torch

    if impl == "naive":
        return _naive
    if impl == "naive_compiled":
        return torch.compile(_naive)
    if impl == "chunked":
        from distill.plugins.fused_losses import CHUNKED_KERNEL

        return lambda h, w, ids, s, a: _is_loss(CHUNKED_KERNEL(h, w, ids[:, None])[:, 0], s, a)
    if impl == "triton":
        from distill.plugins.fused_losses.triton_kernel import TRITON_KERNEL

        return lambda h, w, ids, s, a: _is_loss(TRITON_KERNEL(h, w, ids[:, None])[:, 0], s, a)
    if impl == "cce_torch_compile":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, ids, s, a: linear_cross_entropy(h, w, ids, reduction="sum", impl="torch_compile")
    if impl == "liger_grpo":
        return _liger_grpo()
    raise SystemExit(f"unknown implementation {impl!r}; known: {', '.join(IMPLS['sampled_reverse_kl'])}, triton")


def _liger_grpo() -> Callable[..., Any]:
    """Liger's chunked GRPO loss with its defaults (``chunk_size=1``: one sequence per chunk).

    Without a KL term (``beta=0``) and with the sampling logprobs as the old policy it is a clipped
    importance-sampled loss over the sampled ids: the same per-token work as ours.
    """
    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)

    def run(h, w, ids, s, a):
        shape = (h.shape[0] // LIGER_SEQUENCE, LIGER_SEQUENCE)
        mask = torch.ones(shape, dtype=torch.long, device=h.device)
        advantage = a.view(shape)[:, 0]
        return loss(h.view(*shape, -1), w, ids.view(shape), mask, advantage, old_per_token_logps=s.view(shape))[0]

    return run


def _build_jsd(impl: str, beta: float, temperature: float) -> Callable[..., Any]:
    """The mean over rows of the generalised JSD, as a function of (h, W, teacher h, teacher W)."""
    import torch

    if impl == "naive":
        return _naive_jsd(beta, temperature)
    if impl == "chunked":
        from distill.plugins.fused_losses import CHUNKED_KERNEL

        return lambda h, w, g, u: CHUNKED_KERNEL.divergence(h, w, g, u, beta=beta, temperature=temperature).mean()
    if impl == "liger_jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # No hard (cross-entropy) term; every label valid, so Liger divides by N: the mean over rows.
        loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=temperature)
        return lambda h, w, g, u: loss(h, w, g, u, torch.zeros(h.shape[0], dtype=torch.long, device=h.device))
    raise SystemExit(f"unknown implementation {impl!r}; known: {', '.join(IMPLS['jsd'])}")


def _naive_jsd(beta: float, temperature: float) -> Callable[..., Any]:
    """The reference kernel's formula (TRL's) on materialised logits: the matmuls in the inputs' dtype
    like the other naive implementation, not upcast first, which would only add memory."""
    import torch

    def run(h, w, g, u):
        s = torch.log_softmax((h @ w.T).float() / temperature, dim=-1)
        with torch.no_grad():
            t = torch.log_softmax((g @ u.T).float() / temperature, dim=-1)
        if beta == 0:
            return (t.exp() * (t - s)).sum(-1).mean()
        if beta == 1:
            return (s.exp() * (s - t)).sum(-1).mean()
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        return (beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)).mean()

    return run


class _RssPeak:
    """Highest resident set size seen by a 1 ms sampling thread, in bytes."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def worker(impl: str, n: int, h: int, v: int, args: argparse.Namespace) -> dict:
    import torch

    dtype, device = getattr(torch, args.dtype), args.device
    generator = torch.Generator().manual_seed(0)
    hidden_N_H = (torch.randn(n, h, generator=generator) / h**0.25).to(device, dtype).requires_grad_()
    weight_V_H = (torch.randn(v, h, generator=generator) / h**0.25).to(device, dtype).requires_grad_()
    if args.loss == "jsd":
        teacher_hidden_N_H = (torch.randn(n, h, generator=generator) / h**0.25).to(device, dtype)
        teacher_weight_V_H = (torch.randn(v, h, generator=generator) / h**0.25).to(device, dtype)
        loss_fn = _build_jsd(impl, args.beta[0], args.temperature)
        inputs = (hidden_N_H, weight_V_H, teacher_hidden_N_H, teacher_weight_V_H)
    else:
        ids_N = torch.randint(0, v, (n,), generator=generator).to(device)
        sampling_N = torch.full((n,), -float(torch.log(torch.tensor(float(v)))), device=device)
        advantage_N = torch.randn(n, generator=generator).to(device)
        loss_fn = _build(impl)
        inputs = (hidden_N_H, weight_V_H, ids_N, sampling_N, advantage_N)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def one_pass() -> torch.Tensor:
        hidden_N_H.grad = weight_V_H.grad = None
        loss = loss_fn(*inputs)
        loss.backward()
        sync()
        return loss.detach()

    for _ in range(args.warmup):
        one_pass()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        value = float(one_pass())
        times.append(time.perf_counter() - start)
    hidden_N_H.grad = weight_V_H.grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_pass()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # After timing (which keeps glibc's default, realistic allocation): every allocation of
        # 64 KiB or more becomes its own mmap, and the heap gives back what it holds.
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 65536)
        libc.malloc_trim(0)
        with _RssPeak() as rss:
            base = rss.now()
            one_pass()
        peak = rss.peak - base
    row = {"impl": impl, "loss": args.loss, "N": n, "H": h, "V": v, "dtype": args.dtype,
           "peak_mib": round(peak / 2**20, 1), "ms": round(1000 * statistics.median(times), 1), "value": value}
    return row | ({"beta": args.beta[0], "temperature": args.temperature} if args.loss == "jsd" else {})


# -- the driver: one process per (implementation, shape, beta), interleaved ---------------------


def _run_worker(args: argparse.Namespace, impl: str, shape: tuple[int, int, int], beta: float) -> dict | None:
    python = args.peer_python if impl in PEERS else sys.executable
    if python is None:
        print(f"skip {impl}: no --peer-python with {PEERS[impl]}", file=sys.stderr)
        return None
    n, h, v = shape
    command = [python, __file__, "--worker", impl, str(n), str(h), str(v), "--dtype", args.dtype,
               "--device", args.device, "--warmup", str(args.warmup), "--iters", str(args.iters),
               "--loss", args.loss, "--beta", str(beta), "--temperature", str(args.temperature)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        print(f"skip {impl} {shape} beta={beta}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(row), file=sys.stderr)
    return row


def _case(row: dict) -> tuple:
    return row["N"], row["H"], row["V"], row.get("beta")


def _merge_rounds(runs: list[dict]) -> list[dict]:
    """One row per (implementation, case): the medians over rounds, every round kept beside them."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["impl"], *_case(run)), []).append(run)
    return [
        group[0] | {"peak_mib": round(statistics.median(r["peak_mib"] for r in group), 1),
                    "ms": round(statistics.median(r["ms"] for r in group), 1),
                    "rounds": [{key: r[key] for key in ("peak_mib", "ms")} for r in group]}
        for group in groups.values()
    ]


def _table(rows: list[dict]) -> str:
    header = f"{'N':>6} {'H':>5} {'V':>7} {'beta':>4}  {'impl':<18} {'peak MiB':>9} {'ms':>9} {'mem/naive':>9}"
    lines = [header + f" {'time/naive':>10} {'loss':>10}"]
    for case in dict.fromkeys(_case(r) for r in rows):
        group = [r for r in rows if _case(r) == case]
        base = next((r for r in group if r["impl"] == BASELINE), None)
        for r in group:
            mem = f"{r['peak_mib'] / base['peak_mib']:.2f}" if base else "-"
            speed = f"{r['ms'] / base['ms']:.2f}" if base else "-"
            beta = "-" if r.get("beta") is None else f"{r['beta']:g}"
            lines.append(f"{r['N']:>6} {r['H']:>5} {r['V']:>7} {beta:>4}  {r['impl']:<18} {r['peak_mib']:>9.1f} "
                         f"{r['ms']:>9.1f} {mem:>9} {speed:>10} {r['value']:>10.5g}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--loss", choices=list(IMPLS), default="sampled_reverse_kl")
    parser.add_argument("--beta", type=float, nargs="+", default=[0.5], help="jsd: 0 forward KL, 1 reverse KL (TRL's)")
    parser.add_argument("--temperature", type=float, default=1.0, help="jsd: divides both models' logits")
    parser.add_argument("--shapes", nargs="*", help="N,H,V triples (default: the loss's shapes on the device)")
    parser.add_argument("--impls", nargs="*", help="default: the loss's implementations (+ triton on cuda)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the interleaved sequence, report medians")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--peer-python", help="python of a venv with the peers installed: " + ", ".join(PEERS.values()))
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "N", "H", "V"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, n, h, v = args.worker
        print(json.dumps(worker(impl, int(n), int(h), int(v), args)))
        return
    shapes = SHAPES[args.loss, args.device]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    with_triton = args.device == "cuda" and args.loss == "sampled_reverse_kl"
    impls = args.impls or IMPLS[args.loss] + (["triton"] if with_triton else [])
    cases = [(shape, beta) for shape in shapes for beta in (args.beta if args.loss == "jsd" else [None])]
    runs = [
        row for _ in range(args.rounds) for shape, beta in cases for impl in impls
        if (row := _run_worker(args, impl, shape, beta))
    ]
    rows = _merge_rounds(runs)
    name = "losses" if args.loss == "sampled_reverse_kl" else f"losses-{args.loss}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}-{args.device}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / f"{name}-{args.device}.txt").write_text(_table(rows) + "\n")
    print(_table(rows))


if __name__ == "__main__":
    main()
