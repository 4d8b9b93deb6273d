"""Turn GSM8K question/answer rows into distill rows whose teacher sees the answer.

    python examples/privileged/prepare.py [INPUT] [OUTPUT]

INPUT defaults to ``shared/data/gsm8k_200.jsonl`` next to the repository (``../shared`` from the
repository root); OUTPUT defaults to ``examples/privileged/data/gsm8k.jsonl``. Input rows are
``{"question": str, "answer": str}``, where ``answer`` is either the final number (``"72"``, as
in the shared file) or a full GSM8K solution ending in ``#### 72``. Each output row is::

    {"messages": [{"role": "user", "content": QUESTION}],
     "teacher_messages": [{"role": "user", "content": QUESTION + "\\n\\n" + HINT}],
     "expected_answer": "72"}

where HINT gives the worked solution when the input has one, and always the final answer. The
student is trained on ``messages``; a teacher reads ``teacher_messages`` (the default
``teacher_messages_key``), so it scores the student's tokens knowing the answer.

Rows that cannot be converted (not JSON, not an object, no question, no answer, an answer that is
not a number) are skipped; the count per reason, with the first line number, is printed at the
end. Exit status: 0 when at least one row was written, 1 when none could be, 2 for a missing input.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from distill.data import SkipLine, parse_lines

REPO = Path(__file__).resolve().parents[2]
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "gsm8k_200.jsonl"
DEFAULT_OUTPUT = REPO / "examples" / "privileged" / "data" / "gsm8k.jsonl"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def convert(line: str) -> dict:
    """One input line as a contract row; raises :class:`SkipLine` with a reason."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise SkipLine("invalid_json") from None
    if not isinstance(row, dict):
        raise SkipLine("not_an_object")
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise SkipLine("missing_question")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise SkipLine("missing_answer")
    worked, _, final = str(answer).rpartition("####")
    final = final.strip().replace(",", "")
    if NUMBER.fullmatch(final) is None:
        raise SkipLine("non_numeric_answer")
    question, worked = question.strip(), worked.strip()
    hint = f"Here is a worked solution: {worked}\n" if worked else ""
    hint += f"The final answer is {final}. Now answer the question."
    return {
        "messages": [{"role": "user", "content": question}],
        "teacher_messages": [{"role": "user", "content": f"{question}\n\n{hint}"}],
        "expected_answer": final,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", nargs="?", type=Path, default=DEFAULT_INPUT,
                        help=f"question/answer JSONL (default: {DEFAULT_INPUT})")
    parser.add_argument("output", nargs="?", type=Path, default=DEFAULT_OUTPUT,
                        help=f"contract JSONL to write (default: {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    try:
        # lines end at "\n" only, as the loader reads them: a raw U+2028 inside a string is text
        lines = args.input.read_text(encoding="utf-8-sig").split("\n")
    except FileNotFoundError:
        print(f"prepare.py: input not found: {args.input}", file=sys.stderr)
        return 2

    rows, skipped, first_line = parse_lines(lines, lambda line, number: convert(line))

    if not rows:
        print(f"prepare.py: no usable row in {args.input}; nothing written", file=sys.stderr)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to {args.output}")
    print(f"skipped {sum(skipped.values())} rows")
    for reason, count in sorted(skipped.items()):
        print(f"  {reason}: {count} (first at line {first_line[reason]})")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
