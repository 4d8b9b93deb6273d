"""Throughput of the same run on 1 and N processes of this machine (torchrun, FSDP2, gloo on CPU).

    python bench/scaling.py                          # the demo, 1 and 2 processes, 40 steps, 2 rounds
    python bench/scaling.py --nproc 1 2 --steps 60 --rounds 3 --out bench/results/scaling-cpu.json

Each run is ``distill-run run examples/arithmetic/opd.toml --nproc N`` with evaluation and
checkpoints off; runs are interleaved over rounds. Per run: the median step time after
``--warmup`` steps (``time_step_s`` in metrics.jsonl, written by the main process: the step ends
for every process at the same collective) and completion tokens per second over those steps. One
process uses every core as torch threads; N processes get one thread each (torchrun's default).
On a machine with fewer cores than processes would need, the processes share cores: read the
ratio as what sharding costs or buys on this machine, not as scaling across devices.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def _run(nproc: int, steps: int, out: Path) -> list[dict]:
    sets = [f"train.steps={steps}", "checkpoint.every_steps=0", f"output_dir='{out}'"]
    command = [sys.executable, "-m", "distill.cli", "run", str(ROOT / "examples" / "arithmetic" / "opd.toml"),
               "--no-progress", "--nproc", str(nproc), "--unset", "data.eval",
               *[arg for value in sets for arg in ("--set", value)]]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling-cpu.json")
    args = parser.parse_args()

    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.nproc}
    with tempfile.TemporaryDirectory() as workdir:
        for round_ in range(args.rounds):
            for nproc in args.nproc:
                metrics = _run(nproc, args.steps, Path(workdir) / f"n{nproc}-r{round_}")[args.warmup :]
                seconds = sum(m["time_step_s"] for m in metrics)
                runs[nproc].append({"step_ms": 1e3 * statistics.median(m["time_step_s"] for m in metrics),
                                    "tokens_per_s": sum(m["completion_tokens"] for m in metrics) / seconds})
    base = statistics.median(r["tokens_per_s"] for r in runs[args.nproc[0]])
    rows = []
    for nproc, measured in runs.items():
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in measured)
        rows.append({"nproc": nproc, "step_ms": statistics.median(r["step_ms"] for r in measured),
                     "tokens_per_s": tokens_per_s, "vs_first": tokens_per_s / base, "rounds": measured})
    lines = [f"{'processes':>9} {'step ms':>8} {'tokens/s':>9} {'vs ' + str(args.nproc[0]):>6}"]
    lines += [f"{r['nproc']:>9} {r['step_ms']:>8.1f} {r['tokens_per_s']:>9.0f} {r['vs_first']:>6.2f}" for r in rows]
    lines.append(f"{os.cpu_count()} cores; median over {args.rounds} rounds of steps {args.warmup + 1}-{args.steps}")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "cores": os.cpu_count(), "rows": rows}, indent=1))
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
