"""Build the shipped assets of the privileged-context demo (self-distillation with a hint).

Run from the repository root after the arithmetic demo's assets exist (about a minute on one idle
CPU core; no network, no GPU):

    OMP_NUM_THREADS=1 python examples/privileged/make_assets.py
    python examples/privileged/make_assets.py --threads 1

It reuses the arithmetic demo's tokenizer, problems, model shape, SFT and greedy-evaluation code
(imported from ``examples/arithmetic/make_assets.py``) and (re)writes, next to this file:

* ``data/train.jsonl`` (4000 rows) and ``data/eval.jsonl`` (200 held-out rows): the arithmetic
  demo's 2-digit addition problems, each row with the student's prompt (no hint), the teacher's
  prompt (the same question after a system hint) and the answer::

      {"messages": [{"role": "user", "content": "What is 23+58?"}],
       "teacher_messages": [{"role": "system", "content": "hint: the answer is 81"},
                            {"role": "user", "content": "What is 23+58?"}],
       "expected_answer": "81"}

  The hint is lower case because the tokenizer has no capital ``H``.
* ``model/`` - one tiny Qwen3 (2 layers, hidden 128) trained by SFT on the training problems,
  half of them (a seeded coin per row) behind the hint. Copying the hinted answer is learnt long
  before the arithmetic, so training stops as soon as it answers ``HINT_STOP_ACCURACY`` of a dev
  slice *with* the hint (dev problems are in neither file); without the hint it is still weak.
  ``opd.toml`` uses this folder as both the student's starting weights and the frozen teacher,
  which sees the hint through ``teacher_messages``.

Everything is seeded: reruns rewrite identical files on the same torch build.

Measured here (torch 2.13 CPU, 1 thread), greedy exact match on ``data/eval.jsonl``:
with the hint 93%, without it 7.5% (150 SFT steps, 35 s).
"""

import argparse
import importlib.util
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
ARITHMETIC = HERE.parent / "arithmetic"
HINT_SEED = 20
MODEL_SEED = 21
HINT_STOP_ACCURACY = 0.9
N_DEV = 200
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_arithmetic():
    """The arithmetic demo's make_assets module (problems, model shape, SFT and eval helpers)."""
    spec = importlib.util.spec_from_file_location("arithmetic_make_assets", ARITHMETIC / "make_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hinted_row(a: int, b: int) -> dict:
    question = {"role": "user", "content": f"What is {a}+{b}?"}
    return {"messages": [question],
            "teacher_messages": [{"role": "system", "content": f"hint: the answer is {a + b}"}, question],
            "expected_answer": str(a + b)}


def as_sft(row: dict, *, hint: bool) -> dict:
    """The row as the arithmetic SFT/eval helpers read it: ``messages`` is the prompt used."""
    return {"messages": row["teacher_messages"] if hint else row["messages"],
            "expected_answer": row["expected_answer"]}


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

    eval_pairs, train_pairs, other_pairs = arith.split_problems()
    dev_pairs = other_pairs[len(train_pairs):len(train_pairs) + N_DEV]
    eval_rows = [hinted_row(a, b) for a, b in eval_pairs]
    train_rows = [hinted_row(a, b) for a, b in train_pairs]
    dev_rows = [hinted_row(a, b) for a, b in dev_pairs]
    arith.write_jsonl(HERE / "data" / "eval.jsonl", eval_rows)
    arith.write_jsonl(HERE / "data" / "train.jsonl", train_rows)

    coin = random.Random(HINT_SEED)
    sft_rows = [as_sft(row, hint=coin.random() < 0.5) for row in train_rows]
    dev_hint = [as_sft(row, hint=True) for row in dev_rows]
    dev_plain = [as_sft(row, hint=False) for row in dev_rows]

    def stop(model) -> bool:
        with_hint = arith.evaluate(model, tok, dev_hint)[0]
        without = arith.evaluate(model, tok, dev_plain)[0]
        print(f"  dev accuracy with hint {with_hint:.1%}, without {without:.1%}", flush=True)
        return with_hint >= HINT_STOP_ACCURACY

    hinted = sum(len(row["messages"]) == 2 for row in sft_rows)
    print(f"model: SFT on {len(sft_rows)} problems, {hinted} of them hinted", flush=True)
    model = arith.new_model(tok, MODEL_SEED)
    arith.train(model, arith.sft_tensors(tok, sft_rows),
                steps=600, batch_size=64, lr=1e-3, warmup=20, seed=MODEL_SEED, stop=stop)
    model.save_pretrained(HERE / "model")
    for file in TOKENIZER_FILES:
        shutil.copyfile(ARITHMETIC / "teacher" / file, HERE / "model" / file)

    loaded_tok = AutoTokenizer.from_pretrained(HERE / "model")
    arith.check_tokenizer(loaded_tok)
    loaded = AutoModelForCausalLM.from_pretrained(HERE / "model")
    with_hint = arith.evaluate(loaded, loaded_tok, [as_sft(row, hint=True) for row in eval_rows])
    without = arith.evaluate(loaded, loaded_tok, [as_sft(row, hint=False) for row in eval_rows])
    print(f"model with the hint: eval exact match {with_hint[0]:.1%}, well-formed {with_hint[1]:.1%}")
    print(f"model without it:    eval exact match {without[0]:.1%}, well-formed {without[1]:.1%}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    assert with_hint[0] >= 0.90, "the model has not learnt to use the hint"
    assert without[0] <= 0.40, "without the hint the model leaves too little to distil"
    assert without[1] >= 0.99, "the model has not learnt the output format"


if __name__ == "__main__":
    main()
