"""The shipped demo meets its promise: the student climbs from <= 40% to within 10 points of the teacher."""

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import load_config
from distill.loop import run

DEMO = Path(__file__).resolve().parents[2] / "examples" / "arithmetic"


@pytest.mark.slow
@pytest.mark.parametrize("config_name", ["opd.toml", "topk.toml", "full.toml"])
def test_demo_distills_the_teacher_into_the_student(tmp_path, manager, config_name):
    config = load_config(DEMO / config_name, manager, [f"output_dir='{tmp_path / 'run'}'"])
    summary = run(config, manager, progress=False)
    assert summary["teacher_accuracy"] >= 0.95
    assert summary["student_accuracy_before"] <= 0.40
    assert summary["student_accuracy_after"] >= summary["teacher_accuracy"] - 0.10
    assert summary["reverse_kl_after"] < 0.5 * summary["reverse_kl_before"]
    final = tmp_path / "run" / "final"
    assert AutoModelForCausalLM.from_pretrained(final).config.model_type == "qwen3"
    assert AutoTokenizer.from_pretrained(final).eos_token == "<|endoftext|>"


def test_shipped_tokenizer_renders_one_token_per_digit():
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "student")
    completion = tokenizer.encode("Answer: 81", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in completion] == ["Answer", ":", " ", "8", "1"]
    assert AutoTokenizer.from_pretrained(DEMO / "teacher").get_vocab() == tokenizer.get_vocab()


@pytest.mark.slow
def test_routed_mopd_example_raises_every_route_by_30_points(tmp_path, manager):
    config = load_config(DEMO.parent / "routed_mopd" / "opd.toml", manager, [f"output_dir='{tmp_path}'"])
    summary = run(config, manager, progress=False)
    assert set(summary["per_route"]) == {"add", "sub"}
    for route in summary["per_route"].values():
        assert route["teacher_accuracy"] >= 0.95
        assert route["accuracy_after"] - route["accuracy_before"] >= 0.30
        assert route["rows_scored"] > 0
