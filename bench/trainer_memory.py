"""Memory and time of the ``torch`` trainer's options on a ~100M-parameter Qwen3 student, side by
side: full fine-tune in fp32, bf16-mixed, LoRA rank 16, gradient checkpointing on and off, bf16
weights, and fp32, bf16-mixed and LoRA sharded with FSDP2 over two processes.

    python bench/trainer_memory.py                 # cpu, batch 2: writes bench/results/trainer-memory-cpu.json and .txt
    python bench/trainer_memory.py --configs fp32 "fp32 fsdp2x2" --out /tmp/fsdp.json   # one process against two
    python bench/trainer_memory.py --device cuda --batch 8
    python bench/trainer_memory.py --layers 2 --iters 1 --out /tmp/quick.json   # a quick check of the script

The student is built here, never downloaded: the Qwen3 architecture with 12 layers, hidden 768,
MLP 2048, 12 query and 4 key/value heads of 64, tied embeddings and a 32,000-token vocabulary
(100.1M parameters, a quarter of them the embedding), randomly initialised from its config and
saved once to a temporary folder. Each configuration then runs in two processes of its own, one
for memory and one for time (fresh allocators, so each peak is its own), through the real code:
``TorchTrainer.build`` loads the folder (``from_pretrained``, checkpointing, the peft wrapping) and
``train_step`` trains on one batch of ``--batch`` sequences of ``--seq`` tokens (``--prompt``
prompt tokens, the rest completion), with the default objective (``sampled_reverse_kl``) and the
loss kernel the plugins choose.

A sharded row (``fp32 fsdp2x2``: the ``fp32`` options on two processes) runs each of its two
processes under torchrun (``python -m torch.distributed.run --standalone --nproc_per_node 2
bench/trainer_memory.py --worker ...``; gloo on CPU, NCCL on CUDA, which needs a GPU per process):
``distill.distributed.start`` joins the process group and ``TorchTrainer`` shards the student
itself with FSDP2, as a run under torchrun does. The step trains on the one-process row's global
batch, its ``--batch`` sequences split between the processes, so the step times compare. Each
process measures its own figures, with its own shards; the row shows the highest over the
processes and ``ranks`` in the JSON keeps each one's. The step-time line sets them against the
same options in one process. Each process of a sharded row runs one torch thread, a one-process row
``--threads`` (default 1): two processes then use both of this machine's two cores where one
process used one, and share them with whatever else runs. Read the ratio as what sharding costs or
buys on one machine (0.5x the CPU time per process would be sharding for free), not as scaling
across devices.

Time: the median of ``--iters`` steps after ``--warmup`` steps, CPU seconds of the process on CPU
(``time.process_time``; steadier than wall time on a shared machine, see ENVIRONMENT.md), wall
seconds after ``synchronize`` on CUDA, with the allocator as users have it. ``--rounds R`` repeats
the configurations interleaved (A B C D, A B C D) and reports each one's median over rounds.
``wall_ms`` beside it: the wall time of the same steps.

Memory, after one step that compiles the kernel and makes the optimizer state:
- ``peak``: the highest memory during the next step. On CUDA ``max_memory_allocated``. On CPU torch
  keeps no allocation statistics, so a thread samples the RSS every millisecond, in a process
  started with ``MALLOC_MMAP_THRESHOLD_=65536``: every tensor of 64 KiB or more is then its own
  mmap, returned to the system when freed, so RSS follows the live tensors (with glibc's default,
  memory freed inside the heap stays resident and a peak measures the heap's history: a LoRA
  forward that saves 682 MiB read 1,271 MiB). The peak counts from the RSS before the model was built (the
  interpreter and libraries are not the trainer's). ``ru_maxrss`` is kept beside it.
- ``state``: the bytes of the parameters, their gradients and ``optimizer.state``'s tensors (exact;
  sharded, each DTensor's local shard).
- ``activations``: the peak above the level just before the forward, over one forward to the loss
  exactly as ``train_step`` runs it (``trainer.step_forward``: its autocast,
  ``completion_hidden_states``, the objective with its kernel; sharded, the FSDP root that gathers
  the weights) and no backward: what the forward keeps for backward, plus its transients. Sharded,
  that includes the weights the root keeps gathered until backward (the embeddings, a quarter of
  this student, and the final norm) and each layer's gathered weights while it runs.
  ``saved`` splits what autograd keeps at the forward's end by dtype (saved-tensor hooks, the
  parameters' own storage left out, gathered or not; under checkpointing only what it keeps outside
  the layers shows).

The targets of issue 13 are checked at the end: LoRA's optimizer state at most 0.05x the full
fine-tune's, checkpointing's activations at most 0.5x, bf16-mixed's peak at most 0.75x fp32's; and
issue 14's: each process's state with FSDP2 on two processes at most 0.6x one process's in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

RESULTS = Path(__file__).resolve().parent / "results"
ARCHITECTURE = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
                "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000, "tie_word_embeddings": True,
                "max_position_embeddings": 1024, "pad_token_id": 0, "eos_token_id": 1}
OPTIONS: dict[str, dict[str, Any]] = {  # [trainer] options
    "fp32": {},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "lora-r16": {"lora": {"rank": 16}},
    "fp32+checkpointing": {"gradient_checkpointing": True},
    "bf16": {"precision": "bf16"},
}
CONFIGS: dict[str, tuple[str, int]] = {  # configuration: (its options, processes), run in this order
    "fp32": ("fp32", 1),
    "fp32 fsdp2x2": ("fp32", 2),
    "bf16-mixed": ("bf16-mixed", 1),
    "bf16-mixed fsdp2x2": ("bf16-mixed", 2),
    "lora-r16": ("lora-r16", 1),
    "lora-r16 fsdp2x2": ("lora-r16", 2),
    "fp32+checkpointing": ("fp32+checkpointing", 1),
    "bf16": ("bf16", 1),
}
TARGETS = [  # (what, measure, configuration, against, at most)
    ("LoRA optimizer state", "optimizer_mib", "lora-r16", "fp32", 0.05),
    ("checkpointing activations", "activations_mib", "fp32+checkpointing", "fp32", 0.5),
    ("bf16-mixed peak", "peak_mib", "bf16-mixed", "fp32", 0.75),
    ("FSDP2 state per process", "state_mib", "fp32 fsdp2x2", "fp32", 0.6),
]
# each process's figures; a sharded row shows the highest over its processes
FIGURES = ("peak_mib", "weights_mib", "grads_mib", "optimizer_mib", "state_mib", "activations_mib", "ru_maxrss_mib",
           "baseline_mib", "ms", "wall_ms")
SETTINGS = ("device", "batch", "seq", "prompt", "warmup", "iters", "rounds", "threads", "configs")
_MMAP_THRESHOLD = 65536  # bytes: in the memory processes every larger allocation is its own mmap
MIB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssPeak:
    """Highest resident set size seen by a 1 ms sampling thread, in bytes."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _local(tensor: Any) -> Any:
    """A sharded tensor's (DTensor's) shard on this process, else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _nbytes(tensors: Any) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


class _SavedBytes:
    """Bytes autograd keeps for backward at the end of the forward, by dtype: each storage once,
    counted at the end, so what was freed by then counts nothing (FSDP frees each layer's gathered
    weights after its forward), and the model's parameters left out (read at the end too: the
    weights the FSDP root keeps gathered until backward are its parameters then). The storages are
    held until then, which keeps nothing alive that the graph does not. Inside a checkpointed layer
    checkpointing's own hooks take over, so there only what it keeps shows up here."""

    def __init__(self, model: Any) -> None:
        import torch

        self.model = model
        self.packed: list[tuple[str, Any]] = []  # (dtype, storage)
        self.by_dtype: dict[str, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Any) -> Any:
        self.packed.append((str(t.dtype).removeprefix("torch."), t.untyped_storage()))
        return t

    def __enter__(self) -> Self:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        seen = {_local(p).untyped_storage().data_ptr() for p in self.model.parameters()}
        for name, storage in self.packed:
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                self.by_dtype[name] = self.by_dtype.get(name, 0) + storage.nbytes()
        self.packed.clear()


# -- the worker: one configuration in its own process -------------------------------------------


def _batch(args: argparse.Namespace, vocab: int) -> Any:
    """``--batch`` rollouts of ``--prompt`` prompt tokens and a completion that makes ``--seq`` inputs,
    on ``--device``: this process's share of them when sharded."""
    import attrs
    import torch

    from distill import TokenBatch, distributed
    from distill.align import build_token_batch
    from distill.types import PromptRow, Rollout, TeacherScores

    g = torch.Generator().manual_seed(0)
    completion = args.seq - args.prompt + 1  # the last completion token is a target, never an input
    rollouts, scores = [], []
    for b in range(args.batch):
        prompt = tuple(torch.randint(2, vocab, (args.prompt,), generator=g).tolist())
        row = PromptRow(index=b, messages=(), prompt_ids=prompt)
        sampling_C = -10 * torch.rand(completion, generator=g)  # about log(1/32000) at random init
        rollouts.append(Rollout(row=row, completion_ids_C=torch.randint(2, vocab, (completion,), generator=g),
                                sampling_logprobs_C=sampling_C, model_logprobs_C=sampling_C, finished=True))
        scores.append(TeacherScores(logprobs_C=-10 * torch.rand(completion, generator=g)))
    share = args.batch // distributed.world_size()
    batch = build_token_batch(rollouts, scores, pad_id=0).select(distributed.rank() * share,
                                                                 (distributed.rank() + 1) * share)
    return attrs.evolve(batch, **{field.name: value.to(args.device) for field in attrs.fields(TokenBatch)
                                  if torch.is_tensor(value := getattr(batch, field.name))})


def _trainer(name: str, folder: str, args: argparse.Namespace) -> Any:
    """The configuration's trainer, built by its factory as a run builds it."""
    import attrs

    from distill.config import config_context, parse_config
    from distill.manager import PluginManager

    manager = PluginManager()
    raw = {"student": {"model": folder, "device": args.device}, "data": {"train": "unused.jsonl"},
           "teachers": [{"backend": "hf", "model": folder}],
           "train": {"micro_batch_size": args.batch, "learning_rate": 1e-5},
           "trainer": {"device": args.device, **OPTIONS[CONFIGS[name][0]]}}
    config = parse_config(raw, manager)
    objective = manager.build("loss", config.loss.name, config.loss.options, config_context(config, manager))

    def kernel_for(device: str, dtype: str) -> Any:
        return manager.select_loss_kernel(loss=config.loss.name, kernel=config.loss.kernel, device=device, dtype=dtype)

    context = attrs.evolve(config_context(config, manager), path="trainer", student_path=folder,
                           objective=objective, kernel_for=kernel_for)
    return manager.build("trainer", config.trainer.backend, config.trainer.options, context)


def worker(name: str, folder: str, phase: str, args: argparse.Namespace) -> dict | None:
    """``phase`` ``time``: the median step time; ``memory``: the peak of a step, the state's bytes and
    the forward's activations, after one step that compiles the kernel and makes the optimizer state.
    Under torchrun the row of every process, merged, on the first (None on the others)."""
    import torch

    from distill import distributed

    torch.set_num_threads(args.threads)
    import distill.plugins.torch_trainer  # noqa: F401  (the libraries load before the baseline)
    import transformers  # noqa: F401

    distributed.start()  # under torchrun: the process group, so the trainer shards itself
    baseline = _rss()
    trainer = _trainer(name, folder, args)
    batch = _batch(args, trainer.model.config.vocab_size)
    parameters = list(trainer.model.parameters())
    row = {"config": name, "processes": distributed.world_size(), "parameters": sum(p.numel() for p in parameters),
           "trainable": sum(p.numel() for p in parameters if p.requires_grad),
           "kernel": getattr(trainer.kernel, "name", type(trainer.kernel).__name__)}
    if phase == "time":
        row |= _time(trainer, batch, args)
    else:
        row |= _memory(trainer, batch, baseline, args)
    rows = distributed.gather(row)
    main = distributed.is_main()
    distributed.stop()
    return _over_processes(rows) if main else None


def _time(trainer: Any, batch: Any, args: argparse.Namespace) -> dict:
    import torch

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cpu_s, wall_s, losses = [], [], []
    for step in range(args.warmup + args.iters):
        sync()
        cpu, wall = time.process_time(), time.perf_counter()
        losses.append(trainer.train_step(batch)["loss"])
        sync()
        if step >= args.warmup:
            cpu_s.append(time.process_time() - cpu)
            wall_s.append(time.perf_counter() - wall)
    return {"ms": round(1000 * statistics.median(wall_s if cuda else cpu_s), 1),
            "wall_ms": round(1000 * statistics.median(wall_s), 1), "losses": losses}


def _memory(trainer: Any, batch: Any, baseline: int, args: argparse.Namespace) -> dict:
    import torch

    parameters = list(trainer.model.parameters())
    trainer.train_step(batch)
    weight_bytes = _nbytes(parameters)
    grad_bytes = _nbytes(p.grad for p in parameters if p.grad is not None)
    optimizer_bytes = _nbytes(t for state in trainer.optimizer.state.values() for t in state.values()
                              if torch.is_tensor(t))
    trainer.optimizer.zero_grad(set_to_none=True)  # as train_step leaves them at its start
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        trainer.train_step(batch)
        peak = torch.cuda.max_memory_allocated()
        trainer.optimizer.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with _SavedBytes(trainer.model) as saved:
            loss = trainer.step_forward(batch)
        activations = torch.cuda.max_memory_allocated() - before
    else:
        with _RssPeak() as rss:
            trainer.train_step(batch)
        peak = rss.peak - baseline
        trainer.optimizer.zero_grad(set_to_none=True)
        with _RssPeak() as rss, _SavedBytes(trainer.model) as saved:
            before = _rss()
            loss = trainer.step_forward(batch)
        activations = rss.peak - before
    del loss
    return {
        "peak_mib": round(peak / MIB, 1), "weights_mib": round(weight_bytes / MIB, 1),
        "grads_mib": round(grad_bytes / MIB, 1), "optimizer_mib": round(optimizer_bytes / MIB, 2),
        "state_mib": round((weight_bytes + grad_bytes + optimizer_bytes) / MIB, 1),
        "activations_mib": round(activations / MIB, 1),
        "saved_mib": {dtype: round(n / MIB, 1) for dtype, n in saved.by_dtype.items()},
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "baseline_mib": round(baseline / MIB, 1),
    }


def _over_processes(rows: list[dict]) -> dict:
    """One process's row as it is; several: the highest of each figure over them, each one's kept."""
    if len(rows) == 1:
        return rows[0]
    figures = [key for key in FIGURES if key in rows[0]]
    merged = rows[0] | {key: max(r[key] for r in rows) for key in figures}
    if "saved_mib" in rows[0]:
        merged["saved_mib"] = {dtype: max(r["saved_mib"].get(dtype, 0.0) for r in rows)
                               for dtype in dict.fromkeys(d for r in rows for d in r["saved_mib"])}
    return merged | {"ranks": [{key: r[key] for key in [*figures, "saved_mib"] if key in r} for r in rows]}


# -- the driver: build the student once, one process per configuration, interleaved ------------


def _build_student(folder: Path, layers: int) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**(ARCHITECTURE | {"num_hidden_layers": layers}))).save_pretrained(folder)


def _run_worker(name: str, folder: Path, phase: str, args: argparse.Namespace) -> dict | None:
    processes = CONFIGS[name][1]
    threads = 1 if processes > 1 else args.threads  # sharded: the processes share the cores
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [sys.executable, *(torchrun if processes > 1 else []), __file__, "--worker", name, str(folder), phase,
               "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
               "--prompt", str(args.prompt), "--warmup", str(args.warmup), "--iters", str(args.iters),
               "--threads", str(threads)]
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"}
    env["OMP_NUM_THREADS"] = str(threads)
    if phase == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(_MMAP_THRESHOLD)
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=args.timeout, env=env)
    if done.returncode != 0:
        print(f"{name} ({phase}) failed:\n{done.stderr.strip()}", file=sys.stderr)
        return None
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(row), file=sys.stderr)
    return row


def _run_config(name: str, folder: Path, args: argparse.Namespace) -> dict | None:
    memory = _run_worker(name, folder, "memory", args)
    timing = _run_worker(name, folder, "time", args)
    if not (memory and timing):
        return None
    if "ranks" in memory:
        timing["ranks"] = [m | t for m, t in zip(memory["ranks"], timing["ranks"], strict=True)]
    return memory | timing


def _merge_rounds(runs: list[dict]) -> dict[str, dict]:
    """One row per configuration: the medians over rounds, every round kept beside them (a sharded
    row's ``ranks`` are its first round's)."""
    measures = ("peak_mib", "optimizer_mib", "state_mib", "activations_mib", "ms", "wall_ms", "ru_maxrss_mib")
    rows = {}
    for name in dict.fromkeys(run["config"] for run in runs):
        group = [run for run in runs if run["config"] == name]
        rows[name] = group[0] | {m: statistics.median(r[m] for r in group) for m in measures} | {
            "rounds": [{m: r[m] for m in measures} for r in group]}
    return rows


def _verdicts(rows: dict[str, dict]) -> list[dict]:
    verdicts = []
    for what, measure, name, against, at_most in TARGETS:
        if name in rows and against in rows:
            ratio = rows[name][measure] / rows[against][measure]
            verdicts.append({"target": what, "measure": measure, "config": name, "against": against,
                             "ratio": round(ratio, 4), "at_most": at_most, "met": ratio <= at_most})
    return verdicts


def _table(rows: dict[str, dict], verdicts: list[dict], args: argparse.Namespace) -> str:
    base = rows.get("fp32")
    unit = "wall ms" if args.device == "cuda" else "cpu ms"

    def times(r: dict, measure: str) -> str:
        return f"{r[measure] / base[measure]:.3f}" if base and base[measure] else "-"

    lines = [f"{'config':<19} {'trainable':>11} {'state MiB':>9} {'peak MiB':>8} {'x fp32':>6} {'optim MiB':>9} "
             f"{'x fp32':>6} {'activ MiB':>9} {'x fp32':>6} {'saved MiB':<21} {unit:>7} {'x fp32':>6}"]
    for name, r in rows.items():
        saved = " + ".join(f"{mib:.0f} {dtype.replace('float', 'f')}"
                           for dtype, mib in sorted(r["saved_mib"].items()) if mib >= 0.5)
        lines.append(f"{name:<19} {r['trainable']:>11,} {r['state_mib']:>9.0f} {r['peak_mib']:>8.0f} "
                     f"{times(r, 'peak_mib'):>6} {r['optimizer_mib']:>9.1f} {times(r, 'optimizer_mib'):>6} "
                     f"{r['activations_mib']:>9.0f} {times(r, 'activations_mib'):>6} {saved:<21} {r['ms']:>7.0f} "
                     f"{times(r, 'ms'):>6}")
    first = next(iter(rows.values()))
    lines.append(f"{first['parameters']:,} parameters, batch {args.batch} x {args.seq} tokens ({args.prompt} prompt), "
                 f"{args.device}, {args.threads} thread(s), kernel {first['kernel']}, median of {args.iters} steps "
                 f"after {args.warmup}, {args.rounds} round(s); state = weights + gradients + optimizer state")
    if any(CONFIGS[name][1] > 1 for name in rows):
        lines.append("fsdp2xN: N processes of 1 thread, each on 1/N of the batch; figures per process, "
                     "the highest over the N")
    for name, r in rows.items():
        options, processes = CONFIGS[name]
        if processes > 1 and options in rows:
            alone = rows[options]
            lines.append(f"step time {name} / {options}: {r['ms'] / alone['ms']:.3f}x {unit} per process, "
                         f"{r['wall_ms'] / alone['wall_ms']:.3f}x wall ms ({1 / processes:.2g}x: sharding for free)")
    lines += [f"target {v['target']}: {v['ratio']:.3f}x {v['against']} (at most {v['at_most']}x): "
              f"{'met' if v['met'] else 'MISSED'}" for v in verdicts]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (one micro-batch)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens of each sequence")
    parser.add_argument("--layers", type=int, default=ARCHITECTURE["num_hidden_layers"], help="fewer for a quick check")
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=list(CONFIGS),
                        metavar="CONFIG", help=f"of: {', '.join(CONFIGS)} (quote the sharded ones)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the interleaved sequence, report medians")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                        help="torch threads (default OMP_NUM_THREADS, else 1)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, help="default bench/results/trainer-memory-DEVICE.json (and .txt)")
    parser.add_argument("--worker", nargs=3, metavar=("CONFIG", "FOLDER", "PHASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if (row := worker(*args.worker, args)) is not None:
            print(json.dumps(row))
        return
    if uneven := [name for name in args.configs if args.batch % CONFIGS[name][1]]:
        parser.error(f"--batch {args.batch} does not split evenly over the processes of {', '.join(uneven)}")

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distill-trainer-memory-") as folder:
        _build_student(Path(folder), args.layers)
        runs = [row for _ in range(args.rounds) for name in args.configs
                if (row := _run_config(name, Path(folder), args))]
    rows = _merge_rounds(runs)
    verdicts = _verdicts(rows)
    table = _table(rows, verdicts, args)
    print(table)
    out = args.out or RESULTS / f"trainer-memory-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    record = {"date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "torch": torch.__version__, "architecture": ARCHITECTURE | {"num_hidden_layers": args.layers},
              "settings": {key: getattr(args, key) for key in SETTINGS},
              "seconds": round(time.perf_counter() - began), "rows": rows, "targets": verdicts}
    out.write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
