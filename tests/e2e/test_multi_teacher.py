"""Multi-teacher runs end to end on tiny real models: routed MOPD and blended top-K."""

import json

import pytest

from distill.config import load_config
from distill.errors import DistillError
from distill.loop import run

from ..conftest import build_model, write_jsonl


def _rows(route, n, offset=0):
    return [{"messages": [{"role": "user", "content": f"What is {a}{'+' if route == 'add' else '-'}{a}?"}],
             "teacher": route, "expected_answer": str(2 * a if route == "add" else 0)}
            for a in range(offset, offset + n)]


@pytest.fixture(scope="module")
def second_teacher(tiny_models, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("sub") / "teacher"
    build_model(path, AutoTokenizer.from_pretrained(tiny_models["tokenizer"]), seed=9)
    return path


def _config(tmp_path, tiny_models, second_teacher, loss=""):
    write_jsonl(tmp_path / "train.jsonl", _rows("add", 10) + _rows("sub", 10) + [
        {"messages": [{"role": "user", "content": "What is 2*2?"}], "teacher": "mul"}])
    write_jsonl(tmp_path / "eval.jsonl", _rows("add", 4, 20) + _rows("sub", 6, 20))
    path = tmp_path / "run.toml"
    path.write_text(f"""
output_dir = "{tmp_path / 'out'}"
[student]
model = "{tiny_models['student']}"
[[teachers]]
backend = "hf"
model = "{tiny_models['teacher']}"
route_value = "add"
blend_weight = 2.0
[[teachers]]
backend = "hf"
name = "subtractor"
model = "{second_teacher}"
route_value = "sub"
teacher_messages_key = "sub_view"
[data]
train = "train.jsonl"
eval = "eval.jsonl"
[sampling]
max_new_tokens = 4
[train]
steps = 3
prompt_groups_per_step = 7
completions_per_prompt = 2
threads = 1
{loss}
""")
    return path


@pytest.mark.slow
def test_routed_run_reports_per_teacher_and_per_route(tmp_path, tiny_models, second_teacher, manager):
    summary = run(load_config(_config(tmp_path, tiny_models, second_teacher), manager), manager, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    teachers = summary["teachers"]
    assert set(teachers) == {"add", "subtractor"}
    assert sum(t["rows_scored"] for t in teachers.values()) + summary["rows_skipped"]["unknown_route:mul"] == 3 * 7
    assert teachers["add"]["tokens_scored"] == sum(line.get("teacher/add/tokens_scored", 0) for line in lines)
    per_route = summary["per_route"]
    assert set(per_route) == {"add", "sub"}
    assert per_route["add"]["eval_rows"] == 4 and per_route["sub"]["eval_rows"] == 6
    assert per_route["sub"]["teacher"] == "subtractor"
    assert per_route["sub"]["rows_scored"] == teachers["subtractor"]["rows_scored"]
    for route in per_route.values():
        assert 0.0 <= route["accuracy_before"] <= 1.0 and 0.0 <= route["accuracy_after"] <= 1.0
        assert 0.0 <= route["teacher_accuracy"] <= 1.0
    assert summary["teacher_accuracy"] is None  # two teachers: reported per route instead


@pytest.mark.slow
def test_blended_topk_run(tmp_path, tiny_models, second_teacher, manager):
    config = load_config(_config(tmp_path, tiny_models, second_teacher, '[loss]\nname = "topk_forward_kl"\ntop_k = 3'),
                         manager)
    assert config.router.name == "all"
    summary = run(config, manager, progress=False)
    # every row is scored by both teachers, the unroutable one included
    assert summary["teachers"]["add"]["rows_scored"] == summary["teachers"]["subtractor"]["rows_scored"] == 3 * 7
    assert "unknown_route:mul" not in summary["rows_skipped"]
    assert summary["per_route"]["add"]["accuracy_after"] is not None


def test_on_unknown_route_error_stops_the_run(tmp_path, tiny_models, second_teacher, manager):
    config = load_config(_config(tmp_path, tiny_models, second_teacher), manager,
                         ["router.on_unknown_route='error'", "data.eval=''", "data.shuffle=false"])
    with pytest.raises(DistillError, match=r"Dataset line 21 has teacher = 'mul', which routes to no teacher"):
        run(config, manager, progress=False)


def test_teachers_naming_the_same_model_share_one_instance(tmp_path, tiny_models, manager):
    from distill.loop import Recipe

    path = _config(tmp_path, tiny_models, tiny_models["teacher"])  # both entries name one model
    recipe = Recipe(load_config(path, manager), manager)
    recipe.setup()
    assert recipe.pool.teachers["add"] is recipe.pool.teachers["subtractor"]
    assert {name: ref.prompt_key for name, ref in recipe.pool.refs.items()} == {"add": "teacher_messages",
                                                                               "subtractor": "sub_view"}
