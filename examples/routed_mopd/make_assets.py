"""Build the shipped assets of the routed multi-teacher demo (addition + subtraction), reproducibly.

Run from the repository root after the arithmetic demo's assets exist (about three minutes on one
idle CPU core; no network, no GPU):

    OMP_NUM_THREADS=1 python examples/routed_mopd/make_assets.py
    python examples/routed_mopd/make_assets.py --threads 1

It reuses the arithmetic demo's tokenizer, model shape, SFT and greedy-evaluation code (imported
from ``examples/arithmetic/make_assets.py``) and its addition teacher, and (re)writes, next to
this file:

* ``data/train.jsonl`` - 2000 addition + 2000 subtraction problems, shuffled; ``data/eval.jsonl``
  - 100 + 100 held-out problems. Rows carry the route key:
  ``{"messages": [{"role": "user", "content": "What is 58-23?"}], "teacher": "sub",
  "expected_answer": "35"}``. Operands are 10..99; subtraction has a - b >= 10, so every answer
  has two digits (10..89) as every sum does (see ``split_subtraction``).
  The addition eval rows are the first 100 of ``../arithmetic/data/eval.jsonl``, which the
  arithmetic teacher never saw in either operand order; the addition train rows come from
  ``../arithmetic/data/train.jsonl``.
* ``sub_teacher/`` - the arithmetic demo's architecture (Qwen3, 2 layers, hidden 128) trained by
  SFT on every subtraction problem that is not held out (>= 95% on the sub eval rows is asserted).
  The addition teacher is ``../arithmetic/teacher`` itself (asserted >= 95% on the add eval rows).
* ``student/`` - a new random init trained briefly on ``train.jsonl`` (both skills) until it
  answers ``STUDENT_STOP_ACCURACY`` of each route's dev problems (200 per route, in neither data
  file), in phases so that neither skill runs far ahead (``warm_start_student``): it knows the
  format ``Answer: N<|endoftext|>`` but not yet the arithmetic of either skill (<= 35% per route
  on eval is asserted).

The tokenizer files are copied byte for byte from ``../arithmetic/teacher``, so all three models
share one vocabulary. Everything is seeded: reruns rewrite identical files on the same torch build.

Measured here (torch 2.13 CPU, 1 thread), greedy exact match on ``data/eval.jsonl``:
add teacher 100%, sub teacher 100%; student 19% on add, 24% on sub (170 s).
"""

import argparse
import importlib.util
import json
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
ARITHMETIC = HERE.parent / "arithmetic"
DATA_SEED = 10
SUB_TEACHER_SEED = 11
STUDENT_SEED = 12
N_EVAL_PER_ROUTE = 100
N_TRAIN_PER_ROUTE = 2000
STUDENT_STOP_ACCURACY = 0.2
STUDENT_DEV_ROWS_PER_ROUTE = 200
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_arithmetic():
    """The arithmetic demo's make_assets module (tokenizer, model shape, SFT and eval helpers)."""
    spec = importlib.util.spec_from_file_location("arithmetic_make_assets", ARITHMETIC / "make_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def routed_row(a: int, op: str, b: int) -> dict:
    answer = a + b if op == "+" else a - b
    return {"messages": [{"role": "user", "content": f"What is {a}{op}{b}?"}],
            "teacher": "add" if op == "+" else "sub",
            "expected_answer": str(answer)}


def operands(row: dict, op: str) -> tuple[int, int]:
    question = row["messages"][0]["content"]
    a, b = question.removeprefix("What is ").removesuffix("?").split(op)
    return int(a), int(b)


def split_subtraction() -> tuple[list[tuple[int, int]], ...]:
    """Return (eval pairs, train.jsonl pairs, dev pairs, all non-held-out pairs for the sub teacher)."""
    # a - b >= 10: every answer has two digits, as every sum does. With one-digit answers allowed
    # (a >= b), the student's first digit was mostly wrong, and routed distillation taught it to
    # stop after one digit ("Answer: 1" for 96-84) instead of to subtract: 31% fell to 4-11%.
    pairs = [(a, b) for a in range(20, 100) for b in range(10, a - 9)]
    random.Random(DATA_SEED).shuffle(pairs)
    eval_pairs = pairs[:N_EVAL_PER_ROUTE]
    remaining = pairs[N_EVAL_PER_ROUTE:]
    train_pairs = remaining[:N_TRAIN_PER_ROUTE]
    dev_pairs = remaining[N_TRAIN_PER_ROUTE:N_TRAIN_PER_ROUTE + STUDENT_DEV_ROWS_PER_ROUTE]
    return eval_pairs, train_pairs, dev_pairs, remaining


def by_route(rows: list[dict]) -> dict[str, list[dict]]:
    routes: dict[str, list[dict]] = {}
    for row in rows:
        routes.setdefault(row["teacher"], []).append(row)
    return routes


def warm_start_student(arith, tok, train_rows: list[dict], dev: dict[str, list[dict]]):
    """A new model trained on ``train_rows`` until it answers ``STUDENT_STOP_ACCURACY`` of each
    route's dev problems, and not much longer.

    The two skills click at seed-dependent times, one often hundreds of steps before the other, so
    a single stop leaves one route far ahead. Training therefore goes in phases: whenever a route
    reaches the target, most of its rows leave the training mix and the rest continue (a fresh
    optimizer per phase). Dev problems are in neither data file: accuracy on training rows ran
    far ahead of held-out accuracy (29% vs 6%), as the student memorises.
    """
    student = arith.new_model(tok, STUDENT_SEED)
    pending = sorted(dev)
    reached: list[str] = []

    def stop(model) -> bool:
        scores = {route: arith.evaluate(model, tok, rows)[0] for route, rows in dev.items()}
        print("  dev accuracy " + ", ".join(f"{r} {a:.1%}" for r, a in scores.items()), flush=True)
        reached.extend(r for r in pending if scores[r] >= STUDENT_STOP_ACCURACY)
        return bool(reached)

    for phase in range(len(dev)):
        rows = [row for row in train_rows if row["teacher"] in pending]
        # A quarter as many rows of the routes already at target keep them from being forgotten
        # (without them, addition fell from 20% to 1% in 75 steps of subtraction-only training).
        rows += [row for row in train_rows if row["teacher"] not in pending][:len(rows) // 4]
        print(f"  phase {phase + 1}: {len(rows)} rows of {', '.join(pending)}", flush=True)
        arith.train(student, arith.sft_tensors(tok, rows), steps=600, batch_size=64, lr=1e-3,
                    warmup=20, seed=STUDENT_SEED + phase, stop=stop)
        assert reached, f"the student did not reach the target on {pending} within a phase"
        pending = [route for route in pending if route not in reached]
        reached.clear()
        if not pending:
            break
    student.eval()
    return student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own, which honours OMP_NUM_THREADS)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    hf_logging.disable_progress_bar()
    arith = load_arithmetic()

    tok = AutoTokenizer.from_pretrained(ARITHMETIC / "teacher")
    arith.check_tokenizer(tok)

    # The arithmetic teacher never saw its demo's eval pairs (in either order): they are held out.
    add_eval_pairs = [operands(row, "+") for row in read_jsonl(ARITHMETIC / "data" / "eval.jsonl")]
    add_eval = [routed_row(a, "+", b) for a, b in add_eval_pairs[:N_EVAL_PER_ROUTE]]
    add_pairs = [operands(row, "+") for row in read_jsonl(ARITHMETIC / "data" / "train.jsonl")]
    add_train = [routed_row(a, "+", b) for a, b in add_pairs[:N_TRAIN_PER_ROUTE]]
    add_dev = [routed_row(a, "+", b) for a, b in
               add_pairs[N_TRAIN_PER_ROUTE:N_TRAIN_PER_ROUTE + STUDENT_DEV_ROWS_PER_ROUTE]]
    sub_eval_pairs, sub_train_pairs, sub_dev_pairs, sub_teacher_pairs = split_subtraction()
    sub_eval = [routed_row(a, "-", b) for a, b in sub_eval_pairs]
    sub_train = [routed_row(a, "-", b) for a, b in sub_train_pairs]
    eval_rows = add_eval + sub_eval
    train_rows = add_train + sub_train
    random.Random(DATA_SEED).shuffle(train_rows)
    held_out = {row["messages"][0]["content"] for row in eval_rows}
    assert not held_out & {row["messages"][0]["content"] for row in train_rows}
    arith.write_jsonl(HERE / "data" / "eval.jsonl", eval_rows)
    arith.write_jsonl(HERE / "data" / "train.jsonl", train_rows)

    print(f"sub teacher: SFT on {len(sub_teacher_pairs)} problems", flush=True)
    sub_teacher = arith.new_model(tok, SUB_TEACHER_SEED)
    sub_teacher_rows = [routed_row(a, "-", b) for a, b in sub_teacher_pairs]
    # 600 steps (the addition teacher's recipe) reached only 83%; the jump came at ~700 of 1200.
    arith.train(sub_teacher, arith.sft_tensors(tok, sub_teacher_rows),
                steps=1200, batch_size=128, lr=3e-3, warmup=50, seed=SUB_TEACHER_SEED)

    print(f"student: brief SFT on {len(train_rows)} problems", flush=True)
    dev = {"add": add_dev, "sub": [routed_row(a, "-", b) for a, b in sub_dev_pairs]}
    student = warm_start_student(arith, tok, train_rows, dev)

    for name, model in [("sub_teacher", sub_teacher), ("student", student)]:
        model.save_pretrained(HERE / name)
        for file in TOKENIZER_FILES:
            shutil.copyfile(ARITHMETIC / "teacher" / file, HERE / name / file)

    # Score the saved folders per route, loaded the way the run loads them.
    eval_by_route = by_route(eval_rows)
    results = {}
    for name, folder in [("add teacher", ARITHMETIC / "teacher"), ("sub teacher", HERE / "sub_teacher"),
                         ("student", HERE / "student")]:
        loaded_tok = AutoTokenizer.from_pretrained(folder)
        arith.check_tokenizer(loaded_tok)
        model = AutoModelForCausalLM.from_pretrained(folder)
        results[name] = {route: arith.evaluate(model, loaded_tok, rows)
                         for route, rows in eval_by_route.items()}
    for name, per_route in results.items():
        print(name + ": " + ", ".join(f"{route} exact match {acc:.1%} (well-formed {fmt:.1%})"
                                      for route, (acc, fmt) in per_route.items()))
    print(f"done in {time.perf_counter() - start:.0f} s")
    assert results["add teacher"]["add"][0] >= 0.95, "addition teacher too weak on the held-out rows"
    assert results["sub teacher"]["sub"][0] >= 0.95, "subtraction teacher too weak for the demo"
    for route, (accuracy, formatted) in results["student"].items():
        assert accuracy <= 0.35, f"student leaves too little to distil on route {route}"
        assert formatted >= 0.99, f"student has not learnt the output format on route {route}"


if __name__ == "__main__":
    main()
