"""Where a step's time goes: each phase of our step beside the bare transformers computation it
wraps, on one thread, with the floating-point work each does.

    python bench/step_floor.py                     # the e2e setting: demo models, 64 prompts x 1, 8 tokens
    python bench/step_floor.py --rounds 7 --out bench/results/step-floor-cpu.json

The phases of one step of ``examples/arithmetic/full.toml`` (full-vocabulary reverse KL):
``sample`` (our KV-cached sampler vs ``model.generate(do_sample=True, top_k=0)``), ``score`` (the
teacher pool vs one teacher forward to logits) and ``train`` (our trainer's step vs a student
forward and backward with the materialised reverse KL against precomputed teacher logits, then
clipping and AdamW: TRL's computation). Times are CPU seconds (``time.process_time``) at one torch
thread, the median over ``--rounds`` interleaved rounds: CPU time is what two cores have to share,
and it is far less sensitive than wall time to other work on a small machine. FLOPs are counted
by ``torch.utils.flop_counter`` on the bare computation (matmuls and attention only).

The floor: with every phase at its bare cost, a step needs ``sum(bare)`` CPU seconds, so on two
cores no implementation can run faster than ``sum(bare) / 2`` per step (perfect overlap); the last
lines compare that bound with a TRL steps/s measured by ``bench/e2e.py`` (``--trl-steps-per-s``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_ms(fn: Callable[[], Any]) -> float:
    began = time.process_time()
    fn()
    return (time.process_time() - began) * 1e3


def _gflop(fn: Callable[[], Any]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _phases(args: argparse.Namespace, workdir: str) -> dict[str, dict[str, Callable[[], Any]]]:
    """Our phase and the bare one, per phase name, on the same rows and model weights."""
    from distill.align import build_token_batch
    from distill.config import load_config
    from distill.loop import Recipe
    from distill.manager import PluginManager

    overrides = [f"output_dir={workdir}", f"train.prompt_groups_per_step={args.batch}",
                 "train.completions_per_prompt=1", f"sampling.max_new_tokens={args.max_new_tokens}",
                 "checkpoint.every_steps=0", "eval.every_steps=0", "eval.at_start=false", "train.threads=1"]
    config = load_config(args.config, PluginManager(), overrides)
    recipe = Recipe(config, PluginManager(), resume="never", progress=False)
    recipe.setup()
    loop = asyncio.new_event_loop()  # one loop and one executor, as in a run
    rows = list(recipe.train_data.rows[: args.batch])
    params = config.sampling.params(n=1)
    student, tokenizer = recipe.trainer.model, recipe.tokenizer
    teacher = next(iter(recipe.pool.teachers.values())).model
    pad = tokenizer.pad_token_id

    rollouts = loop.run_until_complete(recipe.sampler.sample(rows, params, seeds=range(len(rows))))
    kept, scores, _ = loop.run_until_complete(recipe.pool.score(rollouts, Counter()))
    batch = build_token_batch(kept, scores, pad_id=pad)

    width = max(len(row.prompt_ids) for row in rows)
    prompts = torch.full((len(rows), width), pad)
    for b, row in enumerate(rows):  # left-padded, as generate wants
        prompts[b, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
    prompt_mask = (prompts != pad).long()
    with torch.no_grad():
        sequences = student.generate(input_ids=prompts, attention_mask=prompt_mask, do_sample=True, top_k=0,
                                     max_new_tokens=args.max_new_tokens, pad_token_id=pad)
    mask = (sequences != pad).long()
    completion = torch.zeros_like(mask)
    completion[:, width:] = mask[:, width:]
    with torch.no_grad():
        teacher_lp = torch.log_softmax(teacher(input_ids=sequences, attention_mask=mask).logits.float(), -1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.0)  # lr 0: the bare step leaves the weights alone

    def bare_sample() -> Any:
        with torch.no_grad():
            return student.generate(input_ids=prompts, attention_mask=prompt_mask, do_sample=True, top_k=0,
                                    max_new_tokens=args.max_new_tokens, pad_token_id=pad)

    def bare_score() -> Any:
        with torch.no_grad():
            return teacher(input_ids=sequences, attention_mask=mask).logits

    def bare_train() -> None:
        optimizer.zero_grad()
        student_lp = torch.log_softmax(student(input_ids=sequences, attention_mask=mask).logits.float(), -1)
        kl = (student_lp.exp() * (student_lp - teacher_lp)).sum(-1)
        ((kl * completion).sum() / completion.sum()).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()

    recipe.trainer.optimizer.param_groups[0]["lr"] = 0.0
    recipe.trainer.scheduler.base_lrs = [0.0]  # our step too leaves the weights alone
    return {
        "sample": {"ours": lambda: loop.run_until_complete(recipe.sampler.sample(rows, params, seeds=range(len(rows)))),
                   "bare": bare_sample},
        "score": {"ours": lambda: loop.run_until_complete(recipe.pool.score(rollouts, Counter())),
                  "bare": bare_score},
        "train": {"ours": lambda: recipe.trainer.train_step(batch), "bare": bare_train},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "arithmetic" / "full.toml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--trl-steps-per-s", type=float, help="TRL's measured steps/s (bench/e2e.py, 2 threads)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON (and a .txt table beside it)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="distill-floor-") as workdir:
        phases = _phases(args, workdir)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped
            for phase, impls in phases.items():
                for impl, fn in impls.items():
                    times.setdefault((phase, impl), []).append(_cpu_ms(fn))
        gflop = {phase: _gflop(impls["bare"]) for phase, impls in phases.items()}

    median = {key: statistics.median(values[1:]) for key, values in times.items()}
    lines = [f"{'phase':<8} {'ours ms':>8} {'bare ms':>8} {'ours/bare':>9} {'GFLOP':>7} {'bare GFLOP/s':>12}"]
    for phase in phases:
        ours, bare = median[(phase, "ours")], median[(phase, "bare")]
        lines.append(f"{phase:<8} {ours:>8.1f} {bare:>8.1f} {ours / bare:>9.2f} {gflop[phase]:>7.2f} "
                     f"{gflop[phase] / bare * 1e3:>12.1f}")
    ours_total = sum(median[(p, "ours")] for p in phases)
    bare_total = sum(median[(p, "bare")] for p in phases)
    lines.append(f"{'step':<8} {ours_total:>8.1f} {bare_total:>8.1f} {ours_total / bare_total:>9.2f} "
                 f"{sum(gflop.values()):>7.2f}")
    floor_s = bare_total / 2 / 1e3
    lines.append(f"two-core floor: {bare_total / 2:.1f} ms per step = {1 / floor_s:.2f} steps/s at most")
    if args.trl_steps_per_s:
        lines.append(f"TRL measured {args.trl_steps_per_s:.2f} steps/s: the floor allows at most "
                     f"{1 / floor_s / args.trl_steps_per_s:.2f}x TRL")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  "torch": torch.__version__, "rounds_ms": {f"{p}/{i}": v for (p, i), v in times.items()},
                  "median_ms": {f"{p}/{i}": v for (p, i), v in median.items()}, "gflop": gflop,
                  "two_core_floor_ms": bare_total / 2, "trl_steps_per_s": args.trl_steps_per_s}
        args.out.write_text(json.dumps(record, indent=1))
        args.out.with_suffix(".txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
