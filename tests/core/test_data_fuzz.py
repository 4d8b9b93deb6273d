"""Property-based tests of the dataset loader: whatever a line holds (arbitrary bytes, any JSON
value, rows with wrong fields), loading never raises anything but :class:`DataError`, every
non-blank line is either kept or counted under exactly one reason, and line numbers are exact.
The number of examples is bounded so that the file runs in a few seconds."""

import codecs
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from distill.data import load_dataset
from distill.errors import DataError

STUDENT = Path(__file__).resolve().parents[2] / "examples" / "arithmetic" / "student"
USER = [{"role": "user", "content": "What is 1+2?"}]
FUZZ = settings(max_examples=50, deadline=None)

# Pieces that have broken line splitting, decoding or tokenizing, mixed with any character.
PIECES = ["What", "1+2", " ", "", "\n", "\r", "\u2028", "\u2029", "\x85", "\ufeff", "\u00e9", "<|end|>", "<|unk|>"]
text = st.lists(st.sampled_from(PIECES) | st.characters(), max_size=6).map("".join)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant", "tool"]) | json_values,
    "content": text | json_values,
})
messages = st.lists(message, max_size=3) | json_values
row = st.fixed_dictionaries({"messages": messages}, optional={
    "teacher_messages": messages, "privileged_messages": messages, "expected_answer": json_values,
})
json_line = st.tuples(row | json_values, st.booleans()).map(
    lambda value_ascii: json.dumps(value_ascii[0], ensure_ascii=value_ascii[1]).encode("utf-8", "surrogatepass")
)
raw_line = st.binary(max_size=20).map(lambda line: line.replace(b"\n", b"")).filter(
    lambda line: not line.startswith(codecs.BOM_UTF8)  # at the start of the file, one is dropped
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STUDENT)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "d.jsonl"


@FUZZ
@given(lines=st.lists(json_line | raw_line, max_size=8), good_at=st.integers(0, 8),
       bom=st.booleans(), ending=st.sampled_from([b"\n", b"\r\n"]))
def test_every_line_is_kept_or_counted_once_at_its_exact_number(tokenizer, path, lines, good_at, bom, ending):
    good_at = min(good_at, len(lines))
    lines.insert(good_at, json.dumps({"messages": USER, "tag": "good"}).encode())
    path.write_bytes(codecs.BOM_UTF8 * bom + b"".join(line + ending for line in lines))

    data = load_dataset(path, tokenizer, max_prompt_tokens=40)

    counted = [number for number, line in enumerate(lines, start=1) if line.strip()]
    kept = [row.index for row in data.rows]
    assert len(kept) + sum(data.skipped.values()) == len(counted)
    assert kept == sorted(set(kept)) and set(kept) <= set(counted)
    assert data.first_skipped_line.keys() == data.skipped.keys()
    assert set(data.first_skipped_line.values()) <= set(counted) - set(kept)
    for kept_row in data.rows:
        assert kept_row.messages == tuple(json.loads(lines[kept_row.index - 1])["messages"])
    assert data.rows[kept.index(good_at + 1)].metadata == {"tag": "good"}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=12) | st.sampled_from(
    [b"\n", b"\r\n", codecs.BOM_UTF8, b'{"messages": ', json.dumps(USER).encode(), b"}", b"\xff"]
)).map(b"".join))
def test_arbitrary_bytes_are_loaded_or_refused_with_a_data_error(tokenizer, path, content):
    path.write_bytes(content)
    counted = [line for line in content.removeprefix(codecs.BOM_UTF8).split(b"\n") if line.strip()]
    try:
        data = load_dataset(path, tokenizer)
    except DataError as error:
        assert str(error).startswith(f"No usable row in {path}.")
    else:
        assert len(data.rows) + sum(data.skipped.values()) == len(counted)


@FUZZ
@given(answer=st.floats() | st.integers(-1000, 1000).map(float) | scalars | json_values)
def test_an_expected_answer_is_kept_as_gradable_text_or_skipped_with_a_reason(tokenizer, path, answer):
    path.write_text(json.dumps({"messages": USER, "expected_answer": answer}) + "\n", encoding="utf-8")
    if isinstance(answer, bool) or not isinstance(answer, (type(None), str, int, float)):
        reason = "wrong_type:expected_answer"
    elif isinstance(answer, float) and not math.isfinite(answer):
        reason = "non_finite:expected_answer"
    else:
        kept = load_dataset(path, tokenizer).rows[0].expected_answer
        if isinstance(answer, (int, float)):
            assert json.loads(kept) == answer and not kept.endswith(".0")
        else:
            assert kept == answer
        return
    with pytest.raises(DataError, match=f"by reason: {reason}: 1 \\(first at line 1\\)"):
        load_dataset(path, tokenizer)
