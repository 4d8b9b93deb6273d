"""examples/privileged/prepare.py turns GSM8K rows into contract rows the project's own loader accepts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from distill.data import load_dataset, render_prompt

REPO = Path(__file__).resolve().parents[2]
PREPARE = REPO / "examples" / "privileged" / "prepare.py"
# The repository is checked out next to the shared folder that holds the real data.
GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k_200.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    # Renders any text through the demo's chat template; characters outside its 64-token
    # vocabulary become <|unk|>, which is all the loader needs.
    return AutoTokenizer.from_pretrained(REPO / "examples" / "arithmetic" / "student")


def run_prepare(*args: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)],
                          capture_output=True, text=True, check=False)


def test_every_shared_gsm8k_row_becomes_a_loadable_privileged_row(tmp_path, tokenizer):
    if not GSM8K.is_file():
        pytest.skip(f"shared GSM8K file not found at {GSM8K}: the repository is expected next to shared/")
    source = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines() if line.strip()]
    output = tmp_path / "gsm8k.jsonl"

    result = run_prepare(GSM8K, output)

    assert result.returncode == 0, result.stderr
    assert f"wrote {len(source)} rows" in result.stdout
    assert "skipped 0 rows" in result.stdout
    dataset = load_dataset(output, tokenizer)
    assert dataset.skipped == {}
    # Every row of the shared file is valid (question text and a bare numeric answer).
    assert len(dataset.rows) == len(source) == 200
    written = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    for row, original, line in zip(dataset.rows, source, written, strict=True):
        question = original["question"].strip()
        assert row.messages == ({"role": "user", "content": question},)
        assert row.prompt_ids == render_prompt(tokenizer, line["messages"])
        # The loader gives the teacher its privileged prompt, not the student's.
        assert row.teacher_prompt_ids() == render_prompt(tokenizer, line["teacher_messages"])
        assert row.teacher_prompt_ids() != row.prompt_ids
        teacher_text = line["teacher_messages"][-1]["content"]
        assert teacher_text.startswith(question)
        assert f"The final answer is {original['answer']}." in teacher_text
        assert row.expected_answer == original["answer"]


def test_malformed_rows_are_skipped_and_counted(tmp_path, tokenizer):
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join([
        json.dumps({"question": "What is 2+3?", "answer": "5"}),
        '{"question": "cut off',
        json.dumps(["question", "answer"]),
        json.dumps({"question": "No answer here?"}),
        json.dumps({"question": "  ", "answer": "1"}),
        json.dumps({"question": "Which colour?", "answer": "blue"}),
        json.dumps({"question": "Who saves what?", "answer": "He saves 2 * 600 = 1,200.\n#### 1,200"}),
        "",
    ]) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"

    result = run_prepare(source, output)

    assert result.returncode == 0, result.stderr
    assert "wrote 2 rows" in result.stdout
    assert "skipped 5 rows" in result.stdout
    for reason, line in [("invalid_json", 2), ("not_an_object", 3), ("missing_answer", 4),
                         ("missing_question", 5), ("non_numeric_answer", 6)]:
        assert f"{reason}: 1 (first at line {line})" in result.stdout
    dataset = load_dataset(output, tokenizer)
    assert dataset.skipped == {}
    assert [row.expected_answer for row in dataset.rows] == ["5", "1200"]
    second = json.loads(output.read_text(encoding="utf-8").splitlines()[1])
    worked = second["teacher_messages"][-1]["content"]
    assert "Here is a worked solution: He saves 2 * 600 = 1,200." in worked
    assert "The final answer is 1200." in worked


def test_an_input_without_usable_rows_writes_nothing(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text("not json\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"

    result = run_prepare(source, output)

    assert result.returncode == 1
    assert "no usable row" in result.stderr
    assert "invalid_json: 1 (first at line 1)" in result.stdout
    assert not output.exists()


def test_line_numbers_count_newlines_only_as_the_loader_does(tmp_path):
    source = tmp_path / "separators.jsonl"
    row = json.dumps({"question": "What is 2+3?\u2028Think.", "answer": "5"}, ensure_ascii=False)
    source.write_text("\ufeff" + row + "\nnot json\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"

    result = run_prepare(source, output)

    assert result.returncode == 0, result.stderr
    assert "wrote 1 rows" in result.stdout
    assert "invalid_json: 1 (first at line 2)" in result.stdout
