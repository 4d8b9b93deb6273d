"""The dataset contract: good rows parsed, bad rows skipped and counted by reason."""

import codecs
import json
import re
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from transformers import AutoTokenizer

from distill import data as data_module
from distill.data import DataCursor, load_dataset, render_prompt
from distill.errors import DataError

from ..conftest import write_jsonl

USER = [{"role": "user", "content": "What is 1+2?"}]
STUDENT = Path(__file__).resolve().parents[2] / "examples" / "arithmetic" / "student"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STUDENT)


def row_line(content: str) -> bytes:
    """One JSONL line as ``json.dumps(..., ensure_ascii=False)`` writes it: raw U+2028 and all."""
    row = {"messages": [{"role": "user", "content": content}]}
    return json.dumps(row, ensure_ascii=False).encode() + b"\n"


def test_good_row_fields_and_metadata(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": USER, "teacher": "math", "expected_answer": 3, "source": "gsm8k", "id": 7},
    ])
    row = load_dataset(path, tokenizer).rows[0]
    assert row.index == 1
    assert row.expected_answer == "3"
    assert row.metadata == {"teacher": "math", "source": "gsm8k", "id": 7}
    assert row.prompt_ids == render_prompt(tokenizer, USER)
    assert tokenizer.decode(row.prompt_ids) == "<|user|>What is 1+2?<|end|><|assistant|>"
    assert row.teacher_prompt_ids() == row.prompt_ids


@pytest.mark.parametrize("key", ["teacher_messages", "privileged_messages", "teacher_prompt_messages"])
def test_teacher_prompt_fallbacks(tmp_path, tokenizer, key):
    hint = [{"role": "system", "content": "hint: 3"}, *USER]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": USER, key: hint}])
    row = load_dataset(path, tokenizer).rows[0]
    assert tokenizer.decode(row.teacher_prompt_ids()) == "<|system|>hint: 3<|end|><|user|>What is 1+2?<|end|><|assistant|>"
    assert key not in row.metadata


def test_teacher_messages_take_precedence_over_later_fallbacks(tmp_path, tokenizer):
    first = [{"role": "user", "content": "a"}]
    second = [{"role": "user", "content": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": USER, "teacher_messages": first, "privileged_messages": second}])
    row = load_dataset(path, tokenizer).rows[0]
    assert row.teacher_prompt_ids() == render_prompt(tokenizer, first)


def test_each_teacher_key_gets_its_own_view_with_fallbacks(tmp_path, tokenizer):
    hint = [{"role": "user", "content": "hint"}]
    solution = [{"role": "user", "content": "solution"}]
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": USER, "privileged_messages": hint, "solution_messages": solution},
        {"messages": USER},
    ])
    keys = ("teacher_messages", "solution_messages", "messages")
    first, second = load_dataset(path, tokenizer, teacher_messages_keys=keys).rows
    assert first.teacher_prompt_ids("teacher_messages") == render_prompt(tokenizer, hint)  # fallback
    assert first.teacher_prompt_ids("solution_messages") == render_prompt(tokenizer, solution)
    assert first.teacher_prompt_ids("messages") == first.prompt_ids
    assert "solution_messages" not in first.metadata
    assert second.teacher_prompt_ids("solution_messages") == second.prompt_ids  # nothing to read: student view


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": USER},                                         # 1 good
        "{not json",                                                # 2
        "[1, 2]",                                                   # 3
        {"prompt": "hi"},                                           # 4
        {"messages": []},                                           # 5
        {"messages": [{"role": "user"}]},                           # 6
        {"messages": "hello"},                                      # 7
        {"messages": USER, "expected_answer": True},                # 8
        {"messages": USER, "expected_answer": [1]},                 # 9
        {"messages": USER, "teacher_messages": [{"content": 1}]},   # 10
        {"messages": [{"role": "user", "content": "x" * 50}]},      # 11 too long
        "",                                                         # blank lines are not rows
        {"messages": USER, "expected_answer": "3"},                 # 13 good
        '{"messages": %s, "expected_answer": %s}' % (json.dumps(USER), "1" * 5000),  # 14 past the digit limit
        "[" * 100_000,                                              # 15 nested past the recursion limit
        '{"messages": [{"role": "user", "content": "\\ud800"}]}',   # 16 a lone surrogate
        {"messages": [{"role": "tool", "content": "3"}]},           # 17 a role the template refuses
    ])
    data = load_dataset(path, tokenizer, max_prompt_tokens=30)
    assert [row.index for row in data.rows] == [1, 13]
    assert data.skipped == {
        "invalid_json": 3,
        "not_an_object": 1,
        "missing_messages": 1,
        "malformed_messages": 3,
        "wrong_type:expected_answer": 2,
        "malformed_teacher_messages": 1,
        "prompt_too_long": 1,
        "template_error": 2,
    }
    assert data.first_skipped_line["malformed_messages"] == 5


def test_a_file_with_no_usable_row_is_a_clear_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ["oops", {"messages": []}])
    with pytest.raises(DataError) as err:
        load_dataset(path, tokenizer)
    assert str(err.value) == (
        f"No usable row in {path}. Skipped rows by reason: invalid_json: 1 (first at line 1), "
        "malformed_messages: 1 (first at line 2)."
    )
    with pytest.raises(DataError, match="Dataset file not found"):
        load_dataset(tmp_path / "missing.jsonl", tokenizer)


def test_lines_end_at_newline_only(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    separators = "\u2028 \u2029 \x85 \x0b \x0c \x1c \r"
    path.write_bytes(row_line(f"What{separators}is 1+2?") + b"{oops\n" + row_line("What is 2+2?"))
    data = load_dataset(path, tokenizer)
    assert [row.index for row in data.rows] == [1, 3]
    assert data.rows[0].messages[0]["content"] == f"What{separators}is 1+2?"
    assert data.skipped == {"invalid_json": 1}
    assert data.first_skipped_line == {"invalid_json": 2}


def test_a_bom_and_crlf_line_endings_are_accepted(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + row_line("What is 1+2?").replace(b"\n", b"\r\n") * 2)
    data = load_dataset(path, tokenizer)
    assert [row.index for row in data.rows] == [1, 2]
    assert data.skipped == {}


def test_a_line_that_is_not_utf8_is_skipped_with_its_line_number(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(row_line("What is 1+2?") + row_line("What is 2+2?").replace(b"2+2", b"2\xff2")
                     + row_line("What is 3+2?"))
    data = load_dataset(path, tokenizer)
    assert [row.index for row in data.rows] == [1, 3]
    assert data.skipped == {"not_utf8": 1}
    assert data.first_skipped_line == {"not_utf8": 2}


def test_a_huge_line_is_rejected_by_size_without_tokenizing(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_bytes(row_line("What is 1+2?") + row_line("1" * 10_000_000))
    rendered, render = [], tokenizer.apply_chat_template

    def spy(messages, **kwargs):
        rendered.append(messages)
        return render(messages, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", spy)
    data = load_dataset(path, tokenizer, max_prompt_tokens=100)
    assert [row.index for row in data.rows] == [1]
    assert data.skipped == {"prompt_too_long": 1}
    assert rendered == [USER]


def test_the_size_check_keeps_a_prompt_longer_in_characters_that_fits_in_tokens(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "What" * 6}]}])
    row = load_dataset(path, tokenizer, max_prompt_tokens=9).rows[0]  # 24 characters, 9 tokens
    assert len(row.prompt_ids) == 9


def test_expected_answers_read_as_a_grader_compares_them(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        '{"messages": %s, "expected_answer": 139.0}' % json.dumps(USER),
        '{"messages": %s, "expected_answer": -0.0}' % json.dumps(USER),
        '{"messages": %s, "expected_answer": 2.5}' % json.dumps(USER),
        '{"messages": %s, "expected_answer": 1e20}' % json.dumps(USER),
        '{"messages": %s, "expected_answer": NaN}' % json.dumps(USER),
        '{"messages": %s, "expected_answer": -Infinity}' % json.dumps(USER),
        '{"messages": %s, "expected_answer": 1e400}' % json.dumps(USER),
    ])
    data = load_dataset(path, tokenizer)
    assert [row.expected_answer for row in data.rows] == ["139", "0", "2.5", "100000000000000000000"]
    assert data.skipped == {"non_finite:expected_answer": 3}
    assert data.first_skipped_line == {"non_finite:expected_answer": 5}


def test_rows_that_ask_nothing_are_skipped(tmp_path, tokenizer):
    assistant = {"role": "assistant", "content": "3"}
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [assistant]},                                               # 1
        {"messages": [{"role": "user", "content": ""}]},                         # 2
        {"messages": [{"role": "user", "content": " \n"}, assistant]},           # 3
        {"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": ""}]},  # 4
        {"messages": USER, "teacher_messages": [assistant]},                     # 5
        {"messages": USER, "privileged_messages": [{"role": "user", "content": ""}]},  # 6
        {"messages": [{"role": "system", "content": ""}, *USER]},                # 7 good
        {"messages": [*USER, assistant, {"role": "user", "content": "Why?"}]},   # 8 good
    ])
    data = load_dataset(path, tokenizer)
    assert [row.index for row in data.rows] == [7, 8]
    assert data.skipped == {
        "assistant_only_messages": 1,
        "empty_content_messages": 3,
        "assistant_only_teacher_messages": 1,
        "empty_content_privileged_messages": 1,
    }
    assert data.first_skipped_line["empty_content_messages"] == 2


def test_prompts_with_the_unknown_token_are_counted_and_warned_about_once(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": USER},
        {"messages": [{"role": "user", "content": "What is 1+2? \u00e9"}]},
        {"messages": USER, "teacher_messages": [{"role": "user", "content": "\u2713"}]},
        {"messages": [{"role": "user", "content": "What is 1+2? <|unk|>"}]},
    ])
    with capture_logs() as logs:
        load_dataset(path, tokenizer)
    warnings = [entry for entry in logs if "unknown token" in entry["event"]]
    assert warnings == [{
        "event": "prompts contain the tokenizer's unknown token; the model cannot read part of them",
        "log_level": "warning", "path": str(path), "token": "<|unk|>", "rows": 3, "first_line": 2,
    }]
    with capture_logs() as logs:
        load_dataset(write_jsonl(tmp_path / "clean.jsonl", [{"messages": USER}]), tokenizer)
    assert logs == []


def test_every_skip_reason_is_documented():
    source = Path(data_module.__file__).read_text()
    reasons = {reason.replace("{field}", "messages") for reason in re.findall(r'SkipLine\(f?"([^"]+)"\)', source)}
    assert len(reasons) > 10
    concepts = (Path(__file__).resolve().parents[2] / "docs" / "concepts.md").read_text()
    assert [reason for reason in sorted(reasons) if f"| `{reason}` |" not in concepts] == []


def test_cursor_walks_seeded_epochs_and_resumes_exactly():
    cursor = DataCursor(5, seed=3, shuffle=True)
    first = cursor.take(4)
    state = cursor.state_dict()
    rest = cursor.take(7)
    assert sorted(first + rest[:1]) == list(range(5))  # epoch 0 is a permutation
    resumed = DataCursor(5, seed=3, shuffle=True)
    resumed.load_state_dict(state)
    assert resumed.take(7) == rest
    with pytest.raises(DataError, match="4 usable rows but the checkpoint was taken with 5"):
        DataCursor(4, seed=3, shuffle=True).load_state_dict(state)
