"""The dataset contract: good rows parsed, bad rows skipped and counted by reason."""

import pytest
from transformers import AutoTokenizer

from distill.data import DataCursor, load_dataset, render_prompt
from distill.errors import DataError

from ..conftest import write_jsonl

USER = [{"role": "user", "content": "What is 1+2?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["tokenizer"])


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
    ])
    data = load_dataset(path, tokenizer, max_prompt_tokens=30)
    assert [row.index for row in data.rows] == [1, 13]
    assert data.skipped == {
        "invalid_json": 1,
        "not_an_object": 1,
        "missing_messages": 1,
        "malformed_messages": 3,
        "wrong_type:expected_answer": 2,
        "malformed_teacher_messages": 1,
        "prompt_too_long": 1,
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
