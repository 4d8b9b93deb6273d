"""End-to-end benchmark: ``distill-run`` against TRL's ``DistillationTrainer`` on the arithmetic demo.

    python -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0     # the CPU build first
    .venv-trl/bin/pip install 'trl==1.16.*' datasets
    python bench/e2e.py                      # writes bench/results/e2e-cpu.json and .txt, prints the tables
    python bench/e2e.py --steps 20 --reps 1  # a quick check
    python bench/e2e.py --variant opd loss.name=sampled_reverse_kl \\
        --variant opd-ref loss.name=sampled_reverse_kl loss.kernel=reference   # any --set overrides

Both sides distill ``examples/arithmetic/teacher`` into the warm-started ``student`` on
``data/train.jsonl`` with the same settings: ``--steps`` steps of ``--batch`` prompts × 1 completion,
8 new tokens at temperature 1 (no top-k/top-p), AdamW at lr 6e-4 with 20 warm-up steps and cosine
decay, gradient clipping at 1.0, fp32, ``--threads`` torch threads, seed 0.

- TRL runs in its own venv (``--peer-python``, default ``.venv-trl/bin/python``; skipped when
  absent) through this file's ``--worker trl``, which imports only torch, transformers, datasets and
  trl: ``DistillationTrainer`` is fully on-policy (HF ``generate``), ``beta=1`` is the reverse KL over
  the full vocabulary. TRL's defaults of gradient checkpointing and bf16 are turned off to match.
- distill runs ``python -m distill.cli run CONFIG --set ...`` (``--config``, default
  ``examples/arithmetic/opd.toml``) with this interpreter, once per ``--variant NAME [KEY=VALUE ...]``,
  whose pairs are extra ``--set`` overrides (default variants: ``opd`` = sampled_reverse_kl,
  ``topk4`` = topk_forward_kl with K=4). Checkpoints only at the last step, no evaluation at start.

The runs are interleaved (TRL, variant 1, variant 2, ... then again, ``--reps`` times) so that the
machine's drift hits all alike. Per run:

- loop time: wall time of the training loop, without model loading, evaluation and saving. TRL: a
  callback from ``on_train_begin`` to each ``on_step_end``, minus the time of its own grading.
  distill: the first step's ``time_step_s`` (``metrics.jsonl``), then the wall time between
  consecutive ``step`` log lines, where an ``eval`` line restarts the clock (the bookkeeping
  between steps is counted, evaluation is not); ``step_time_sum_s``, the plain sum of
  ``time_step_s``, is kept for comparison.
- steps/s and completion tokens/s over the loop time (tokens up to and including EOS: TRL's
  ``completion_mask``, distill's ``completion_tokens``).
- final accuracy: ONE grader for both sides, this file's ``--worker grade`` (plain transformers
  greedy ``generate``, 8 new tokens, ``Answer:\\s*(-?\\d+)`` against ``expected_answer``) on the
  200 rows of ``data/eval.jsonl``, applied to the saved final student. It also grades the teacher
  and the initial student once.
- time to target: the loop time at the first evaluation (every ``--eval-every`` steps and at the
  last step) whose accuracy reaches ``--target`` (default: the teacher's accuracy − 3 points).
  TRL's evaluations use the same grader on the live model; distill's are its own
  ``eval_history``, which is also greedy exact match with the same pattern on the same rows.

The table shows medians over repetitions; its ratios are medians of per-repetition ratios to the
TRL run of the same repetition (steps/s: > 1 is faster than TRL; time to target: < 1 is sooner).
Timings on shared machines drift: compare ratios from one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "arithmetic"
RESULTS = Path(__file__).resolve().parent / "results"
ANSWER = re.compile(r"Answer:\s*(-?\d+)")
MAX_NEW_TOKENS = 8
LEARNING_RATE = 6e-4
WARMUP_STEPS = 20
MAX_GRAD_NORM = 1.0
SEED = 0
TARGET_MARGIN = 0.03  # default target: the teacher's accuracy minus 3 points
DEFAULT_VARIANTS = [["opd", "loss.name=sampled_reverse_kl"], ["topk4", "loss.name=topk_forward_kl", "loss.top_k=4"]]
TRL = "trl"


# -- workers: the shared grader and the TRL run (stdlib + torch/transformers/trl/datasets only) --


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def grade(model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int = 64) -> float:
    """Greedy exact match: ``generate`` on left-padded chat prompts, the answer pattern's group vs expected."""
    import torch

    was_training = model.training
    model.eval()
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    correct = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                prompts = [tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True,
                                                         tokenize=True, return_dict=False) for row in chunk]
                width = max(len(p) for p in prompts)
                ids_B_P = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
                mask_B_P = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
                out_B_L = model.generate(input_ids=ids_B_P, attention_mask=mask_B_P, max_new_tokens=MAX_NEW_TOKENS,
                                         do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)
                texts = tokenizer.batch_decode(out_B_L[:, width:], skip_special_tokens=True)
                for row, text in zip(chunk, texts, strict=True):
                    match = ANSWER.search(text)
                    correct += match is not None and match.group(1) == row["expected_answer"].strip()
    finally:
        model.train(was_training)
    return correct / len(rows)


def grade_worker(model_dir: str, threads: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {"accuracy": grade(model, tokenizer, _rows(DEMO / "data" / "eval.jsonl"))}


def trl_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One DistillationTrainer run; returns per-step cumulative loop time and tokens, and the eval curve."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    torch.set_num_threads(spec["threads"])
    steps, eval_every = spec["steps"], spec["eval_every"]
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "student", padding_side="left")
    eval_rows = _rows(DEMO / "data" / "eval.jsonl")
    train = Dataset.from_list([{"prompt": row["messages"]} for row in _rows(DEMO / "data" / "train.jsonl")])

    class CountingTrainer(DistillationTrainer):
        """Counts the completion tokens (through EOS) that each generation batch trains on."""

        completion_tokens = 0

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            output = super()._generate_and_score_completions(inputs)
            self.completion_tokens += int(output["completion_mask"].sum())
            return output

    class Timeline(TrainerCallback):
        """Loop time after every step, grading the live model every ``eval_every`` steps off the clock."""

        def __init__(self, trainer: CountingTrainer) -> None:
            self.trainer = trainer
            self.start = self.excluded = 0.0
            self.tokens_before = 0
            self.step_loop_s: list[float] = []
            self.step_tokens: list[int] = []
            self.curve: list[dict[str, Any]] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            loop_s = time.perf_counter() - self.start - self.excluded
            self.step_loop_s.append(loop_s)
            self.step_tokens.append(self.trainer.completion_tokens - self.tokens_before)
            self.tokens_before = self.trainer.completion_tokens
            if state.global_step % eval_every == 0 or state.global_step == steps:
                began = time.perf_counter()
                self.curve.append({"step": state.global_step, "loop_s": loop_s,
                                   "accuracy": grade(model, tokenizer, eval_rows)})
                self.excluded += time.perf_counter() - began

    config = DistillationConfig(
        output_dir=spec["output_dir"],
        max_steps=steps,
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE,
        warmup_steps=WARMUP_STEPS,
        lr_scheduler_type="cosine",
        max_grad_norm=MAX_GRAD_NORM,
        beta=1.0,  # reverse KL
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_completion_length=MAX_NEW_TOKENS,
        activation_checkpointing=False,  # TRL defaults gradient_checkpointing, its deprecated alias, to on
        bf16=False,  # TRL's default is on; both sides train in fp32
        use_cpu=True,
        seed=SEED,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = CountingTrainer(model=str(DEMO / "student"), teacher_model=str(DEMO / "teacher"), args=config,
                              train_dataset=train, processing_class=tokenizer)
    timeline = Timeline(trainer)
    trainer.add_callback(timeline)
    trainer.train()
    trainer.save_model(spec["final_dir"])
    return {"step_loop_s": timeline.step_loop_s, "step_tokens": timeline.step_tokens, "curve": timeline.curve,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": trl.__version__}}


# -- the driver ------------------------------------------------------------------------------


class RunFailed(Exception):
    pass


def _subprocess(command: list[str], threads: int, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RunFailed(f"timed out after {timeout:.0f} s: {' '.join(command)}") from exc
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-25:])
        raise RunFailed(f"exit {done.returncode}: {' '.join(command)}\n{tail}")
    return done


def _grade_dir(model_dir: Path, args: argparse.Namespace) -> float:
    done = _subprocess([sys.executable, __file__, "--worker", "grade", str(model_dir), "--threads", str(args.threads)],
                       args.threads, args.timeout)
    return json.loads(done.stdout.strip().splitlines()[-1])["accuracy"]


def _run_trl(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    spec = {"steps": args.steps, "batch": args.batch, "threads": args.threads, "eval_every": args.eval_every,
            "output_dir": str(workdir / "trainer"), "final_dir": str(workdir / "final")}
    workdir.mkdir(parents=True)
    result_path = workdir / "result.json"
    _subprocess([args.peer_python, __file__, "--worker", "trl", json.dumps(spec), str(result_path)],
                args.threads, args.timeout)
    result = json.loads(result_path.read_text())
    return {**result, "final_dir": workdir / "final"}


def _distill_timeline(stderr: str, metrics: list[dict[str, Any]]) -> dict[int, float]:
    """Cumulative loop seconds after each step, from the step and eval log lines' timestamps."""
    step_s = {m["step"]: m["time_step_s"] for m in metrics}
    loop_s, last, cumulative = 0.0, None, {}
    for line in stderr.splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if event.get("event") not in ("step", "eval"):
            continue
        now = datetime.fromisoformat(event["timestamp"]).timestamp()
        if event["event"] == "step":
            loop_s += step_s[event["step"]] if last is None else now - last
            cumulative[event["step"]] = loop_s
        last = now  # after an eval line, the clock restarts: evaluation is not loop time
    return cumulative


def _run_distill(args: argparse.Namespace, overrides: list[str], workdir: Path) -> dict[str, Any]:
    settings = {
        "output_dir": workdir, "seed": SEED, "sampling.max_new_tokens": MAX_NEW_TOKENS, "sampling.temperature": 1.0,
        "train.steps": args.steps, "train.prompt_groups_per_step": args.batch, "train.completions_per_prompt": 1,
        "train.learning_rate": LEARNING_RATE, "train.warmup_steps": WARMUP_STEPS, "train.schedule": "cosine",
        "train.max_grad_norm": MAX_GRAD_NORM, "train.threads": args.threads, "checkpoint.every_steps": 0,
        "eval.at_start": "false", "eval.every_steps": args.eval_every,
    }
    command = [sys.executable, "-m", "distill.cli", "run", str(args.config), "--no-progress"]
    for item in [f"{k}={v}" for k, v in settings.items()] + overrides:
        command += ["--set", item]
    done = _subprocess(command, args.threads, args.timeout)
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((workdir / "summary.json").read_text())
    loop_s_by_step = _distill_timeline(done.stderr, metrics)
    return {
        "step_loop_s": list(loop_s_by_step.values()),
        "step_tokens": [m["completion_tokens"] for m in metrics],
        "curve": [{"step": e["step"], "loop_s": loop_s_by_step[e["step"]], "accuracy": e["accuracy"]}
                  for e in summary["eval_history"]],
        "step_time_sum_s": sum(m["time_step_s"] for m in metrics),
        "time_s": summary["time_s"],
        "own_final_accuracy": summary["student_accuracy_after"],
        "loss_kernel": summary["loss_kernel"],
        "final_dir": workdir / "final",
    }


def _measure(raw: dict[str, Any], args: argparse.Namespace, target: float) -> dict[str, Any]:
    """Adds the headline numbers to a run's raw timeline; the final model is graded by the shared grader."""
    loop_s, tokens = raw["step_loop_s"][-1], sum(raw["step_tokens"])
    reached = next((point for point in raw["curve"] if point["accuracy"] >= target), None)
    final_dir = raw.pop("final_dir")
    return {**raw, "steps": len(raw["step_loop_s"]), "loop_s": loop_s, "steps_per_s": len(raw["step_loop_s"]) / loop_s,
            "completion_tokens": tokens, "tokens_per_s": tokens / loop_s,
            "final_accuracy": _grade_dir(final_dir, args),
            "time_to_target_s": reached["loop_s"] if reached else None,
            "step_to_target": reached["step"] if reached else None}


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present and len(present) == len(values) else None


def _summaries(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per variant: medians over repetitions, and medians of per-repetition ratios to TRL."""
    trl_by_rep = {r["rep"]: r for r in runs if r["variant"] == TRL and "error" not in r}
    rows = []
    for name in names:
        ok = [r for r in runs if r["variant"] == name and "error" not in r]
        if not ok:
            rows.append({"variant": name, "runs": 0})
            continue
        pairs = [(r, trl_by_rep[r["rep"]]) for r in ok if r["rep"] in trl_by_rep]
        speed = [r["steps_per_s"] / t["steps_per_s"] for r, t in pairs]
        to_target = [r["time_to_target_s"] / t["time_to_target_s"] if r["time_to_target_s"] and t["time_to_target_s"]
                     else None for r, t in pairs]
        rows.append({
            "variant": name, "runs": len(ok),
            **{key: _median([r[key] for r in ok]) for key in
               ("loop_s", "steps_per_s", "tokens_per_s", "final_accuracy", "time_to_target_s")},
            "steps_per_s_vs_trl": _median(speed) if speed else None,
            "time_to_target_vs_trl": _median(to_target) if to_target else None,
        })
    return rows


def _table(rows: list[dict[str, Any]], target: float) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'variant':<12} {'runs':>4} {'loop s':>8} {'steps/s':>8} {'tok/s':>8} {'final acc':>9} "
             f"{f'to {target:.0%} s':>10} {'steps/s vs trl':>14} {'to-target vs trl':>16}"]
    for r in rows:
        if not r["runs"]:
            lines.append(f"{r['variant']:<12} {0:>4}  (every run failed)")
            continue
        lines.append(f"{r['variant']:<12} {r['runs']:>4} {fmt(r['loop_s'], '.1f'):>8} "
                     f"{fmt(r['steps_per_s'], '.2f'):>8} {fmt(r['tokens_per_s'], '.0f'):>8} {fmt(r['final_accuracy'], '.1%'):>9} "
                     f"{fmt(r['time_to_target_s'], '.1f'):>10} {fmt(r['steps_per_s_vs_trl'], '.2f'):>14} "
                     f"{fmt(r['time_to_target_vs_trl'], '.2f'):>16}")
    return "\n".join(lines)


def _run_table(runs: list[dict[str, Any]]) -> str:
    """One line per run, in the order run: a repetition that a busy machine slowed stands out."""
    trl_by_rep = {r["rep"]: r for r in runs if r["variant"] == TRL and "error" not in r}
    lines = [f"{'variant':<12} {'rep':>4} {'loop s':>8} {'steps/s':>8} {'final acc':>9} {'target at step':>14} "
             f"{'steps/s vs trl':>14}"]
    for r in runs:
        if "error" in r:
            lines.append(f"{r['variant']:<12} {r['rep']:>4}  failed")
            continue
        trl = trl_by_rep.get(r["rep"])
        speed = f"{r['steps_per_s'] / trl['steps_per_s']:.2f}" if trl else "-"
        lines.append(f"{r['variant']:<12} {r['rep']:>4} {r['loop_s']:>8.1f} {r['steps_per_s']:>8.2f} "
                     f"{r['final_accuracy']:>9.1%} {r['step_to_target'] or '-':>14} {speed:>14}")
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("torch", "transformers", "distill")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64, help="prompts per step (1 completion each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--target", type=float, help="held-out accuracy in [0, 1] (default: teacher's - 0.03)")
    parser.add_argument("--config", type=Path, default=DEMO / "opd.toml", help="distill config the variants override")
    parser.add_argument("--variant", action="append", nargs="+", metavar=("NAME", "KEY=VALUE"),
                        help="a distill run: a name and its --set overrides (repeatable; default: opd, topk4)")
    parser.add_argument("--peer-python", default=str(ROOT / ".venv-trl" / "bin" / "python"),
                        help="python of a venv with trl and datasets")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument("--out", type=Path, default=RESULTS / "e2e-cpu.json")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.eval_every < 1:
        parser.error("--eval-every must be at least 1")
    if args.worker:
        kind, *rest = args.worker
        if kind == "grade":
            print(json.dumps(grade_worker(rest[0], args.threads)))
        else:
            Path(rest[1]).write_text(json.dumps(trl_worker(json.loads(rest[0]))))
        return

    variants = {name: overrides for name, *overrides in (args.variant or DEFAULT_VARIANTS)}
    if TRL in variants:
        parser.error(f"--variant {TRL!r} is the TRL run's name; choose another")
    names = ([TRL] if Path(args.peer_python).exists() else []) + list(variants)
    if TRL not in names:
        print(f"skip {TRL}: no {args.peer_python} (see the module docstring to make it)", file=sys.stderr)
    teacher_accuracy = _grade_dir(DEMO / "teacher", args)
    student_accuracy = _grade_dir(DEMO / "student", args)
    target = args.target if args.target is not None else teacher_accuracy - TARGET_MARGIN
    print(f"teacher {teacher_accuracy:.1%}, initial student {student_accuracy:.1%}, target {target:.1%}",
          file=sys.stderr)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="distill-e2e-") as tmp:
        for rep in range(args.reps):
            for name in names:
                workdir = Path(tmp) / f"{name}-{rep}"
                began = time.perf_counter()
                try:
                    raw = _run_trl(args, workdir) if name == TRL else _run_distill(args, variants[name], workdir)
                    run = {"variant": name, "rep": rep, "overrides": variants.get(name, []),
                           **_measure(raw, args, target)}
                except (RunFailed, OSError, KeyError, ValueError, IndexError) as exc:
                    print(f"{name} rep {rep} FAILED: {exc}", file=sys.stderr)
                    run = {"variant": name, "rep": rep, "error": str(exc)}
                run["process_wall_s"] = time.perf_counter() - began
                runs.append(run)
                if "error" not in run:
                    reached = f"step {run['step_to_target']}" if run["step_to_target"] else "not reached"
                    print(f"{name} rep {rep}: loop {run['loop_s']:.1f} s, {run['steps_per_s']:.2f} steps/s, "
                          f"final {run['final_accuracy']:.1%}, target {reached}", file=sys.stderr)
    summary = _summaries(runs, names)
    table = _table(summary, target) + "\n\n" + _run_table(runs)
    trl_versions = next((r["versions"] for r in runs if r["variant"] == TRL and "versions" in r), None)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "settings": {"steps": args.steps, "prompts_per_step": args.batch, "completions_per_prompt": 1,
                     "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "learning_rate": LEARNING_RATE,
                     "warmup_steps": WARMUP_STEPS, "schedule": "cosine", "max_grad_norm": MAX_GRAD_NORM,
                     "threads": args.threads, "reps": args.reps, "eval_every": args.eval_every, "seed": SEED,
                     "config": str(args.config), "variants": variants},
        "versions": {"distill_side": _versions(), "trl_side": trl_versions},
        "teacher_accuracy": teacher_accuracy, "initial_student_accuracy": student_accuracy, "target": target,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".txt").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
