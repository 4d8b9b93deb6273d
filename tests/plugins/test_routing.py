"""Routers: single, routed MOPD by row[route_key], all (for blending)."""

import pytest

from distill.config import parse_config
from distill.errors import ConfigError, DistillError
from distill.plugins.routing import AllRouter, RoutedOptions, RoutedRouter
from distill.protocols import SkipRow
from distill.types import PromptRow


def _row(index=3, **metadata):
    return PromptRow(index=index, messages=(), prompt_ids=(1,), metadata=metadata)


def test_routed_sends_each_row_to_exactly_its_teacher():
    router = RoutedRouter({"add": "adder", "sub": "subtractor"}, RoutedOptions())
    assert router.route(_row(teacher="add")) == ("adder",)
    assert router.route(_row(teacher="sub")) == ("subtractor",)


@pytest.mark.parametrize(("metadata", "reason"), [
    ({"teacher": "mul"}, "unknown_route:mul"),
    ({}, "unknown_route:<missing>"),
    ({"teacher": 3}, "unknown_route:3"),
])
def test_unroutable_rows_are_skipped_with_the_value_as_reason(metadata, reason):
    router = RoutedRouter({"add": "adder"}, RoutedOptions())
    with pytest.raises(SkipRow) as skip:
        router.route(_row(**metadata))
    assert skip.value.reason == reason


def test_unroutable_row_stops_the_run_when_asked():
    router = RoutedRouter({"add": "adder", "sub": "s"}, RoutedOptions(route_key="skill", on_unknown_route="error"))
    assert router.route(_row(skill="add")) == ("adder",)
    with pytest.raises(DistillError) as err:
        router.route(_row(skill="mul"))
    assert str(err.value) == (
        "Dataset line 3 has skill = 'mul', which routes to no teacher (known: add, sub). Fix the row, "
        "add a teacher with that route_value, or set router.on_unknown_route = \"skip\"."
    )


def test_all_router_skips_zero_weight_teachers():
    assert AllRouter(("a", "c")).route(_row()) == ("a", "c")


MINIMAL = {"student": {"model": "s"}, "data": {"train": "t.jsonl"}}


def _teachers(*entries):
    return {**MINIMAL, "teachers": [{"backend": "hf", **e} for e in entries]}


def test_auto_router_picks_by_teacher_count_and_loss(manager):
    assert parse_config(_teachers({"model": "a"}), manager).router.name == "single"
    two = _teachers({"model": "a"}, {"model": "b"})
    assert parse_config(two, manager).router.name == "routed"
    assert parse_config({**two, "loss": {"name": "topk_forward_kl"}}, manager).router.name == "all"


def test_multi_teacher_config_errors_have_paths(manager):
    raw = _teachers({"model": "a", "route_value": "x"}, {"model": "b", "route_value": "x", "name": "b"})
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == [
        "route value 'x' is already used by teachers[0]; each teacher needs its own route_value @ teachers[1].route_value"
    ]
    raw = _teachers({"model": "a", "blend_weight": -1.0}, {"model": "b", "blend_weight": float("inf")})
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == [
        "must be >= 0, got -1.0 @ teachers[0].blend_weight",
        "must be finite, got inf @ teachers[1].blend_weight",
    ]
    raw = {**_teachers({"model": "a"}, {"model": "b"}), "router": {"name": "all"}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == [
        "router 'all' has several teachers score each row, which needs a top-K loss to blend them "
        "(e.g. topk_forward_kl); loss 'sampled_reverse_kl' trains on one teacher's logprobs: use "
        "router 'routed' @ router.name"
    ]
    raw = {**_teachers({"model": "a", "blend_weight": 0.0}, {"model": "b", "blend_weight": 0.0}),
           "loss": {"name": "topk_forward_kl"}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == ["router 'all' needs at least one teacher with blend_weight > 0 @ teachers"]
    raw = {**_teachers({"model": "a"}, {"model": "b"}), "router": {"on_unknown_route": "ignore"}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == ["must be one of 'skip', 'error', got 'ignore' @ router.on_unknown_route"]
