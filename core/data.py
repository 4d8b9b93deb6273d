"""The dataset contract: JSONL rows in, validated :class:`PromptRow` objects out.

A row needs ``messages`` (OpenAI chat format). Optional: ``teacher_messages`` (the teacher's own
prompt; fallbacks ``privileged_messages``, ``teacher_prompt_messages``, then ``messages``),
``expected_answer``, and ``teacher`` (the route value, read by the router). Every field other than
the messages and the answer is kept as metadata. A bad row is skipped and counted under a reason,
never a crash deep inside a step.

Lines end at ``\n`` only and are decoded one by one, so a raw U+2028 inside a string, a UTF-8 BOM
or one undecodable line never shifts the line numbers that skip reports and errors cite.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, AnyStr, TypeVar

import attrs
import structlog

from distill.errors import DataError
from distill.types import PromptRow

__all__ = [
    "TEACHER_MESSAGES_FALLBACKS",
    "Dataset",
    "load_dataset",
    "derive_seed",
    "sample_seed",
    "SkipLine",
    "parse_lines",
    "render_prompt",
    "DataCursor",
]

T = TypeVar("T")
log = structlog.get_logger("distill")

TEACHER_MESSAGES_FALLBACKS = ("teacher_messages", "privileged_messages", "teacher_prompt_messages")


class SkipLine(Exception):
    """Raised by a line parser for a line to skip; ``reason`` is what it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_lines(
    lines: Sequence[AnyStr], parse: Callable[[AnyStr, int], T]
) -> tuple[list[T], Counter[str], dict[str, int]]:
    """``parse(line, line_number)`` of each non-blank line (text or raw bytes); the lines it
    rejects with :class:`SkipLine` are counted by reason, with the first line number of each."""
    parsed: list[T] = []
    skipped: Counter[str] = Counter()
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            parsed.append(parse(line, number))
        except SkipLine as skip:
            skipped[skip.reason] += 1
            first_line.setdefault(skip.reason, number)
    return parsed, skipped, first_line


@attrs.frozen
class Dataset:
    """Usable rows of one file and, by reason, the rows that were skipped."""

    path: str
    rows: tuple[PromptRow, ...]
    skipped: dict[str, int]
    first_skipped_line: dict[str, int]


def _check_messages(value: Any, field: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not value:
        raise SkipLine(f"malformed_{field}")
    for message in value:
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise SkipLine(f"malformed_{field}")
    # The model answers the last message that is not its own: without one, or with it blank, the
    # prompt is little more than the chat template and the row would be trained on silently.
    asked = [message for message in value if message["role"] != "assistant"]
    if not asked:
        raise SkipLine(f"assistant_only_{field}")
    if not asked[-1]["content"].strip():
        raise SkipLine(f"empty_content_{field}")
    return tuple(value)


def _text_length(messages: Sequence[dict[str, Any]]) -> int:
    return sum(len(message["role"]) + len(message["content"]) for message in messages)


def _check_answer(answer: Any) -> str:
    """The answer as the text a grader compares: ``139.0`` reads ``"139"``, never ``"139.0"``."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise SkipLine("wrong_type:expected_answer")
    if isinstance(answer, float):
        if not math.isfinite(answer):
            raise SkipLine("non_finite:expected_answer")
        if answer.is_integer():
            return str(int(answer))
    return str(answer)


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[int, ...]:
    """Prompt ids through the chat template, ending with the assistant's generation prompt."""
    ids = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return tuple(int(i) for i in ids)


def _parse_row(
    raw: bytes,
    index: int,
    tokenizer: Any,
    *,
    max_prompt_tokens: int | None,
    max_prompt_chars: int | None,
    teacher_messages_keys: Sequence[str],
) -> PromptRow:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SkipLine("not_utf8") from None
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # also an integer past Python's digit limit, deep nesting
        raise SkipLine("invalid_json") from None
    if not isinstance(row, dict):
        raise SkipLine("not_an_object")
    if "messages" not in row:
        raise SkipLine("missing_messages")
    messages = _check_messages(row["messages"], "messages")

    teacher_messages: dict[str, tuple[dict[str, Any], ...]] = {}
    for wanted in teacher_messages_keys:
        for key in dict.fromkeys((wanted, *TEACHER_MESSAGES_FALLBACKS)):
            if row.get(key) is not None:
                teacher_messages[wanted] = _check_messages(row[key], key)
                break

    answer = row.get("expected_answer")
    if answer is not None:
        answer = _check_answer(answer)

    views = [messages, *teacher_messages.values()]
    if max_prompt_chars is not None and max(map(_text_length, views)) > max_prompt_chars:
        raise SkipLine("prompt_too_long")
    try:
        prompt_ids = render_prompt(tokenizer, messages)
        teacher_prompts = {key: render_prompt(tokenizer, view) for key, view in teacher_messages.items()}
    except Exception:  # a template or tokenizer that raises on this row's content (a lone surrogate)
        raise SkipLine("template_error") from None
    longest = max([len(prompt_ids), *(len(ids) for ids in teacher_prompts.values())])
    if max_prompt_tokens is not None and longest > max_prompt_tokens:
        raise SkipLine("prompt_too_long")

    contract = {"messages", "expected_answer", *TEACHER_MESSAGES_FALLBACKS, *teacher_messages_keys}
    return PromptRow(
        index=index,
        messages=messages,
        prompt_ids=prompt_ids,
        teacher_prompts=teacher_prompts,
        expected_answer=answer,
        metadata={k: v for k, v in row.items() if k not in contract},
    )


def load_dataset(
    path: str | Path,
    tokenizer: Any,
    *,
    max_prompt_tokens: int | None = None,
    teacher_messages_keys: Sequence[str] = ("teacher_messages",),
) -> Dataset:
    """Read a JSONL file; raise :class:`DataError` if it is missing or has no usable row, and warn
    once when prompts contain the tokenizer's unknown token (the model cannot read that text).

    A teacher prompt is rendered for each of ``teacher_messages_keys``: the row's field of that
    name, else the first of ``teacher_messages``, ``privileged_messages``,
    ``teacher_prompt_messages`` present, else the student's own prompt.
    """
    path = Path(path)
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "The student tokenizer has no chat template, so prompts cannot be rendered. "
            "Add `chat_template` to its tokenizer_config.json."
        )
    try:
        lines = path.read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n")
    except FileNotFoundError:
        raise DataError(f"Dataset file not found: {path}") from None
    # No token covers more characters than the longest vocabulary entry, so a longer text cannot
    # fit: it is rejected before tokenizing (a 10 MB line takes most of a minute to tokenize).
    max_prompt_chars = None
    if max_prompt_tokens is not None:
        max_prompt_chars = max_prompt_tokens * max(map(len, tokenizer.get_vocab()))

    rows, skipped, first_line = parse_lines(
        lines,
        lambda line, number: _parse_row(line, number, tokenizer, max_prompt_tokens=max_prompt_tokens,
                                        max_prompt_chars=max_prompt_chars,
                                        teacher_messages_keys=teacher_messages_keys),
    )
    if not rows:
        reasons = ", ".join(f"{r}: {n} (first at line {first_line[r]})" for r, n in skipped.items())
        raise DataError(f"No usable row in {path}. Skipped rows by reason: {reasons or 'file is empty'}.")
    unk = tokenizer.unk_token_id  # None for a byte-level tokenizer: then no id matches
    unknown = [row.index for row in rows
               if any(unk in ids for ids in (row.prompt_ids, *row.teacher_prompts.values()))]
    if unknown:
        log.warning("prompts contain the tokenizer's unknown token; the model cannot read part of them",
                    path=str(path), token=tokenizer.unk_token, rows=len(unknown), first_line=unknown[0])
    return Dataset(str(path), tuple(rows), dict(skipped), first_line)


def derive_seed(seed: int, index: int) -> int:
    """A seed of its own for epoch or step ``index`` of a run seeded with ``seed``."""
    return seed * 1_000_003 + index


def sample_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th row (or completion) under ``seed``: 31 bits, what remote APIs
    take, hashed so that neighbouring seeds and indices do not share random streams."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


class DataCursor:
    """Walks the rows epoch after epoch, each epoch a seeded permutation; resumable from its state."""

    def __init__(self, n_rows: int, *, seed: int, shuffle: bool) -> None:
        self.n_rows = n_rows
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.n_rows))
        if self.shuffle:
            random.Random(derive_seed(self.seed, epoch)).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        """The next ``count`` row indices, moving into the next epoch when one is used up."""
        picked = []
        while len(picked) < count:
            if self.position == self.n_rows:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            picked.append(self._order[self.position])
            self.position += 1
        return picked

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n_rows": self.n_rows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n_rows"] != self.n_rows:
            raise DataError(
                f"The dataset has {self.n_rows} usable rows but the checkpoint was taken with "
                f"{state['n_rows']}: resuming would not continue the same run. Restore the data "
                f"file or start a new output_dir."
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
