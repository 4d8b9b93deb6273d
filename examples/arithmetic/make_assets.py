"""Build the shipped assets of the 2-digit addition demo, reproducibly.

Run from the repository root (about a minute on 2 idle CPU cores; no network, no GPU):

    python examples/arithmetic/make_assets.py            # torch's default thread count
    OMP_NUM_THREADS=1 python examples/arithmetic/make_assets.py
    python examples/arithmetic/make_assets.py --threads 1

It (re)writes, next to this file:

* ``data/eval.jsonl``  - 200 held-out problems; ``data/train.jsonl`` - 4000 training problems.
  Rows look like ``{"messages": [{"role": "user", "content": "What is 23+58?"}],
  "expected_answer": "81"}``; operands are 10..99. No eval pair appears in training data, in
  either operand order.
* ``teacher/`` - a tiny Qwen3ForCausalLM (2 layers, hidden 128) trained by supervised
  fine-tuning on every 2-digit problem that is not held out; 100% greedy exact match on eval
  (>= 95% is asserted).
* ``student/`` - the same architecture from a different random init, trained only briefly on
  ``train.jsonl``: it has learnt the output format ``Answer: N<|endoftext|>`` but not the
  arithmetic (<= 40% on eval), which leaves room for on-policy distillation from the teacher.

Both model folders hold fp32 safetensors weights and the tokenizer, and load with plain
``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)``.

The tokenizer is character-level BPE (``tokenizers`` library): every character is a token, and
only a handful of merges turn the template words ``What``, ``is`` and ``Answer`` into single
tokens, so a completion (``Answer: 198<|endoftext|>``) is at most 7 tokens. Digits never merge.
Chat format (no BOS): ``<|user|>What is 23+58?<|end|><|assistant|>`` then the completion
``Answer: 81<|endoftext|>``; earlier assistant turns render as ``<|assistant|>TEXT<|end|>``.

Everything is seeded: reruns rewrite byte-identical files (checked with 1 and 2 threads on
torch 2.13 CPU; another BLAS build may round differently and shift the accuracies slightly).
"""

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
)
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
DATA_SEED = 0
TEACHER_SEED = 1
STUDENT_SEED = 2
N_EVAL = 200
N_TRAIN = 4000
# The student stops training once it answers this share of the first rows of train.jsonl.
STUDENT_STOP_ACCURACY = 0.25
STUDENT_PROBE_ROWS = 400
MAX_NEW_TOKENS = 8
ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
ROLE_TOKENS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# Whitespace control (`-`) on every tag so the template itself emits no stray characters; message
# content is emitted verbatim.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Unsupported role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level BPE with 64 tokens: specials, digits, lower-case letters, the two capitals
    of the templates, whitespace, some punctuation, and merges for the template words."""
    specials = [PAD, EOS, *ROLE_TOKENS, UNK]
    alphabet = [*"0123456789", *"abcdefghijklmnopqrstuvwxyz", "A", "W", " ", "\n", *".,:?!+-="]
    merges = [("W", "h"), ("Wh", "a"), ("Wha", "t"), ("i", "s"),
              ("A", "n"), ("An", "s"), ("Ans", "w"), ("Answ", "e"), ("Answe", "r")]
    vocab = {t: i for i, t in enumerate(specials + alphabet + [a + b for a, b in merges])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK))
    # Letter runs are words (merge candidates); every other character stands alone, so digits,
    # spaces and punctuation are always single tokens.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z]+|[^A-Za-z]"), behavior="isolated")
    # Tokens carry their own spaces, so decoding is plain concatenation.
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=ROLE_TOKENS,
        model_max_length=64,
        chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(tok: PreTrainedTokenizerFast, folder: Path) -> None:
    # Keep the chat template inside tokenizer_config.json, which transformers 4.x and 5 both read
    # (the default chat_template.jinja file is unknown to older 4.x releases).
    tok.save_pretrained(folder, save_jinja_files=False)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # transformers 5 writes its v5-only class name `TokenizersBackend`, and a list under
    # `extra_special_tokens`, which 4.x expects to be a dict; both versions accept these instead.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = config.pop("extra_special_tokens")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def split_problems() -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """Return (eval pairs, train.jsonl pairs, all non-held-out pairs for the teacher)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(DATA_SEED).shuffle(pairs)
    eval_pairs = pairs[:N_EVAL]
    # Hold out both operand orders so that commutativity cannot leak eval answers.
    held_out = set(eval_pairs) | {(b, a) for a, b in eval_pairs}
    remaining = [p for p in pairs if p not in held_out]
    return eval_pairs, remaining[:N_TRAIN], remaining


def make_row(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {a}+{b}?"}],
            "expected_answer": str(a + b)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    # transformers 5 returns a BatchEncoding here unless return_dict=False.
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                   return_dict=False)


def sft_tensors(tok, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels; loss only on the completion tokens."""
    sequences = []
    for row in rows:
        prompt = prompt_ids(tok, row["messages"])
        completion = tok.encode(f"Answer: {row['expected_answer']}", add_special_tokens=False)
        completion.append(tok.eos_token_id)
        sequences.append((prompt, completion))
    width = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        labels[i, len(prompt):n] = torch.tensor(completion)
        attention_mask[i, :n] = 1
    return input_ids, attention_mask, labels


def new_model(tok, seed: int):
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model


def train(model, tensors, *, steps: int, batch_size: int, lr: float, warmup: int, seed: int,
          stop=None, check_every: int = 5) -> None:
    """AdamW with linear warmup and cosine decay to zero over `steps`, sampling batches epoch by
    epoch. If given, `stop(model)` is asked every `check_every` steps whether to end early."""
    input_ids, attention_mask, labels = tensors
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(input_ids), generator=generator)])
        idx, order = order[:batch_size], order[batch_size:]
        loss = model(input_ids=input_ids[idx], attention_mask=attention_mask[idx],
                     labels=labels[idx]).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}", flush=True)
        if stop is not None and (step + 1) % check_every == 0:
            model.eval()
            if stop(model):
                print(f"  stopped after {step + 1} steps", flush=True)
                return
            model.train()
    model.eval()


@torch.no_grad()
def evaluate(model, tok, rows: list[dict]) -> tuple[float, float]:
    """Greedy decoding; returns (exact-match accuracy, fraction of well-formed completions)."""
    prompts = [prompt_ids(tok, row["messages"]) for row in rows]
    width = max(map(len, prompts))
    # Left padding keeps every prompt's last token in the final column for batched generation.
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                         max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    correct = well_formed = 0
    for row, new_ids in zip(rows, out[:, width:].tolist()):
        if tok.eos_token_id in new_ids:
            new_ids = new_ids[:new_ids.index(tok.eos_token_id) + 1]
        text = tok.decode(new_ids)
        well_formed += re.fullmatch(r"Answer: \d+" + re.escape(EOS), text) is not None
        match = ANSWER_RE.search(text)
        correct += match is not None and match.group(1) == row["expected_answer"]
    return correct / len(rows), well_formed / len(rows)


def check_tokenizer(tok) -> None:
    for text in ["What is 23+58?", "Answer: 81", "Answer: 198"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text, text
        tokens = tok.convert_ids_to_tokens(ids)
        assert all(len(t) == 1 for t in tokens if any(c.isdigit() for c in t)), tokens
    expected = tok.encode("<|user|>What is 23+58?<|end|><|assistant|>", add_special_tokens=False)
    assert prompt_ids(tok, [{"role": "user", "content": "What is 23+58?"}]) == expected
    assert tok.bos_token_id is None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own, which honours OMP_NUM_THREADS)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    hf_logging.disable_progress_bar()

    tok = build_tokenizer()
    check_tokenizer(tok)

    eval_pairs, train_pairs, teacher_pairs = split_problems()
    eval_rows = [make_row(a, b) for a, b in eval_pairs]
    train_rows = [make_row(a, b) for a, b in train_pairs]
    write_jsonl(HERE / "data" / "eval.jsonl", eval_rows)
    write_jsonl(HERE / "data" / "train.jsonl", train_rows)

    print(f"teacher: SFT on {len(teacher_pairs)} problems", flush=True)
    teacher = new_model(tok, TEACHER_SEED)
    train(teacher, sft_tensors(tok, [make_row(a, b) for a, b in teacher_pairs]),
          steps=600, batch_size=128, lr=3e-3, warmup=50, seed=TEACHER_SEED)

    # The format is learnt within a few dozen steps and the arithmetic later, in a sudden jump
    # whose timing depends on the seed: 300 steps gave 6% to 90% on eval across seeds. Stopping
    # on accuracy over a slice of the training set left 20-32% on eval for each of 8 seeds.
    print(f"student: brief SFT on {len(train_rows)} problems", flush=True)
    student = new_model(tok, STUDENT_SEED)
    probe_rows = train_rows[:STUDENT_PROBE_ROWS]
    train(student, sft_tensors(tok, train_rows),
          steps=600, batch_size=64, lr=1e-3, warmup=20, seed=STUDENT_SEED,
          stop=lambda model: evaluate(model, tok, probe_rows)[0] >= STUDENT_STOP_ACCURACY)

    for name, model in [("teacher", teacher), ("student", student)]:
        model.save_pretrained(HERE / name)
        save_tokenizer(tok, HERE / name)

    # Score the saved folders, loaded the way users will load them.
    results = {}
    for name in ["teacher", "student"]:
        loaded_tok = AutoTokenizer.from_pretrained(HERE / name)
        check_tokenizer(loaded_tok)
        model = AutoModelForCausalLM.from_pretrained(HERE / name)
        results[name] = evaluate(model, loaded_tok, eval_rows)
    for name, (accuracy, formatted) in results.items():
        print(f"{name}: eval exact match {accuracy:.1%}, well-formed {formatted:.1%}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    assert results["teacher"][0] >= 0.95, "teacher too weak for the demo"
    assert results["student"][0] <= 0.40, "student leaves too little to distil"
    assert results["student"][1] >= 0.99, "student has not learnt the output format"


if __name__ == "__main__":
    main()
