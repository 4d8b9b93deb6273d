"""Config: strict structuring, every error at once with its path, overrides, secrets masked."""

import json
import subprocess
import sys

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill import MetricSinkSpec, TeacherSpec, hookimpl
from distill.config import (
    DataConfig,
    EvalConfig,
    SamplingConfig,
    StudentConfig,
    TrainConfig,
    apply_overrides,
    display_config,
    load_config,
    parse_config,
)
from distill.errors import ConfigError

MINIMAL = {
    "student": {"model": "s"},
    "data": {"train": "t.jsonl"},
    "teachers": [{"backend": "hf", "model": "t"}],
}


def _raw(**changes):
    raw = json.loads(json.dumps(MINIMAL))
    for dotted, value in changes.items():
        apply_overrides(raw, [f"{dotted.replace('__', '.')}={value}"])
    return raw


def test_minimal_config_gets_documented_defaults(manager):
    config = parse_config(MINIMAL, manager)
    assert config.loss.name == "sampled_reverse_kl"
    assert config.loss.options.ratio_log_cap == 20.0
    assert config.sampler.backend == "hf" and config.sampler.options.batch_size == 64
    assert config.teachers[0].options.model == "t"
    assert config.router.name == "single"
    assert config.metrics.sinks == ("jsonl",)


def test_every_error_is_reported_at_once_with_its_path(manager):
    raw = _raw()
    raw["train"] = {"steps": 0, "learning_rate": -1.0, "bogus": 1}
    raw["sampling"] = {"temperature": "hot"}
    raw["teachers"][0]["batch_size"] = 0
    raw["teachers"][0]["colour"] = "red"
    raw["loss"] = {"name": "fkl"}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager, source="run.toml")
    assert err.value.problems == [
        "must be float, got 'hot' @ sampling.temperature",
        "unknown key 'bogus' @ train",
    ]
    raw["train"].pop("bogus")
    raw["sampling"]["temperature"] = 0.0
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager, source="run.toml")
    assert err.value.problems == [
        "must be > 0, got 0.0 @ sampling.temperature",
        "must be > 0, got 0 @ train.steps",
        "must be > 0, got -1.0 @ train.learning_rate",
        "unknown key 'colour' @ teachers[0]",
        "Unknown loss 'fkl'. Available: full_forward_kl, full_reverse_kl, generalized_jsd, sampled_reverse_kl, topk_forward_kl. @ loss.name",
    ]
    assert str(err.value).startswith("5 config error(s) in run.toml:\n  - must be > 0, got 0.0 @ sampling.temperature")


def test_types_are_strict(manager):
    raw = _raw()
    raw["train"] = {"steps": 1.5, "micro_batch_size": True}
    raw["data"]["shuffle"] = "yes"
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert sorted(err.value.problems) == [
        "must be bool, got 'yes' @ data.shuffle",
        "must be int, got 1.5 @ train.steps",
        "must be int, got True @ train.micro_batch_size",
    ]


def test_missing_required_and_literal_choices(manager):
    raw = _raw()
    del raw["student"]["model"]
    raw["train"] = {"schedule": "exp"}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert sorted(err.value.problems) == [
        "must be one of 'constant', 'linear', 'cosine', got 'exp' @ train.schedule",
        "required key missing @ student.model",
    ]


def test_empty_teacher_list_and_bad_blend_weight(manager):
    raw = _raw()
    raw["teachers"] = []
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == ["must list at least one teacher ([[teachers]]) @ teachers"]
    raw["teachers"] = [{"backend": "hf", "model": "t", "blend_weight": float("nan")}]
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == ["must be finite, got nan @ teachers[0].blend_weight"]


def test_topk_larger_than_a_teacher_cap_is_a_config_error(manager):
    @attrs.frozen
    class CappedOptions:
        model: str = "m"

    class Capped:
        @staticmethod
        def check(options, context):
            if context.top_k > 5:
                return [f"top_k {context.top_k} exceeds what teacher '{context.teachers[0].name}' can return "
                        f"(at most 5) @ loss.top_k"]
            return []

        @hookimpl
        def distill_teachers(self):
            return [TeacherSpec(name="capped", summary="", config_cls=CappedOptions, factory=None,
                                check=self.check, model_of=lambda options: options.model)]

    manager.register(Capped(), name="capped")
    raw = _raw()
    raw["teachers"] = [{"backend": "capped"}]
    raw["loss"] = {"name": "topk_forward_kl", "top_k": 8}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == [
        "top_k 8 exceeds what teacher 'm' can return (at most 5) @ loss.top_k"
    ]


def test_overrides_parse_toml_values_and_index_lists():
    raw = _raw()
    apply_overrides(raw, ["train.steps=7", "train.learning_rate=1e-3", "teachers.0.model=other",
                          "sampling.top_p=0.5", "output_dir=runs/x", "data.shuffle=false"])
    assert raw["train"] == {"steps": 7, "learning_rate": 1e-3}
    assert raw["teachers"][0]["model"] == "other"
    assert raw["output_dir"] == "runs/x" and raw["data"]["shuffle"] is False
    with pytest.raises(ConfigError) as err:
        apply_overrides(raw, ["train.steps", "teachers.3.model=x"])
    assert err.value.problems == [
        "override 'train.steps' is not KEY=VALUE @ --set",
        "no list item 3 for override 'teachers.3.model=x' @ --set",
    ]


def test_secrets_are_masked_in_display(manager):
    @attrs.frozen
    class RemoteOptions:
        model: str
        api_key: str | None = None
        api_key_env: str = "FIREWORKS_API_KEY"

    class Remote:
        @hookimpl
        def distill_teachers(self):
            return [TeacherSpec(name="remote", summary="", config_cls=RemoteOptions, factory=None)]

    manager.register(Remote(), name="remote")
    raw = _raw()
    raw["teachers"] = [{"backend": "remote", "model": "m", "api_key": "sk-very-secret"}]
    shown = json.dumps(display_config(parse_config(raw, manager)))
    assert "sk-very-secret" not in shown
    assert '"api_key": "***"' in shown and '"api_key_env": "FIREWORKS_API_KEY"' in shown


def test_validate_command_prints_every_error_and_exits_non_zero(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(
        '[student]\nmodel = "s"\n[data]\ntrain = "t"\n[[teachers]]\nbackend = "nope"\n'
        '[train]\nsteps = -3\n'
    )
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "validate", str(config)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"distill-run: 2 config error(s) in {config}:\n"
        "  - must be > 0, got -3 @ train.steps\n"
        "  - Unknown teacher 'nope'. Available: fireworks, hf, vllm. @ teachers[0].backend\n"
    )


def test_load_config_reports_missing_file_and_bad_toml(tmp_path, manager):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml", manager)
    (tmp_path / "bad.toml").write_text("[student\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml", manager)


def test_component_checks_run_at_config_time(manager):
    raw = _raw()
    raw["teachers"].append({"backend": "hf", "model": "t"})
    raw["teachers"].append({"backend": "hf", "model": "u"})
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == [
        "teacher name 't' is already used by teachers[0]; give one of them a distinct `name` @ teachers[1]",
    ]
    raw["teachers"][1]["name"] = "t2"
    with pytest.raises(ConfigError) as err:  # router "auto" picks "routed" for several teachers
        parse_config(raw, manager)
    assert err.value.problems == [
        "route value 't' is already used by teachers[0]; each teacher needs its own route_value "
        "@ teachers[1].route_value"
    ]
    raw["router"] = {"name": "single"}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == ["router 'single' needs exactly one teacher, got 3 @ router.name"]


def test_source_is_not_a_config_key(manager):
    with pytest.raises(ConfigError) as err:
        parse_config({**_raw(), "source": "x"}, manager)
    assert err.value.problems == ["unknown key 'source' @ (top level)"]


def test_a_plugin_conflict_is_reported_once_not_per_section(manager):
    from distill.errors import ComponentConflictError
    from distill.plugins import losses

    class Again:
        distill_losses = staticmethod(losses.distill_losses)

    manager.register(Again(), name="losses_again")
    with pytest.raises(ComponentConflictError, match="loss 'sampled_reverse_kl' is registered twice"):
        parse_config(_raw(), manager)


def test_field_mistakes_are_reported_with_their_path(manager):
    raw = _raw()
    raw.update(output_dir="", seed=2**32)
    raw["train"] = {"adam_betas": [0.9, 1.0]}
    raw["metrics"] = {"sinks": ["jsonl", "jsonl"]}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == [
        "must not be empty, got '' @ output_dir",
        "must be in [0, 2**32), got 4294967296 @ seed",
        "must be two numbers in [0, 1), got [0.9, 1.0] @ train.adam_betas",
        "must list each name once, got ['jsonl', 'jsonl'] @ metrics.sinks",
    ]
    raw.update(output_dir="out", seed=-1)
    raw["train"] = {"adam_betas": [0.9]}
    raw["metrics"] = {}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == ["must be a list of 2 values, got [0.9] @ train.adam_betas"]


def test_a_string_is_not_taken_apart_into_a_list(manager):
    @attrs.frozen
    class ColumnsOptions:
        columns: tuple[str, ...] = ()

    class Columns:
        @hookimpl
        def distill_metric_sinks(self):
            return [MetricSinkSpec(name="columns", summary="", config_cls=ColumnsOptions, factory=None)]

    manager.register(Columns(), name="columns")
    raw = _raw(metrics__sinks="columns")
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == ['must be a list, got \'columns\'; write ["columns"] @ metrics.sinks']
    raw = _raw(metrics__sinks='["columns"]', metrics__columns__columns="loss")
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == ['must be a list, got \'loss\'; write ["loss"] @ metrics.columns.columns']
    raw = _raw(metrics__sinks='["columns"]', metrics__columns__columns='["loss"]')
    assert parse_config(raw, manager).metrics.options["columns"].columns == ("loss",)


def test_a_misspelt_key_names_the_close_match(manager):
    raw = _raw()
    raw["train"] = {"lerning_rate": 1e-3, "zzz": 1}
    raw["teachers"][0].update(blend_wieght=0.5, batch_sise=8)
    raw["sed"] = 3
    with pytest.raises(ConfigError) as err:
        parse_config(raw, manager)
    assert err.value.problems == [
        "unknown key 'lerning_rate'; did you mean 'learning_rate'? @ train",
        "unknown key 'zzz' @ train",
        "unknown key 'sed'; did you mean 'seed'? @ (top level)",
    ]
    del raw["train"], raw["sed"]
    with pytest.raises(ConfigError) as err:  # a component section: its options and the core's keys
        parse_config(raw, manager)
    assert err.value.problems == [
        "unknown key 'batch_sise'; did you mean 'batch_size'? @ teachers[0]",
        "unknown key 'blend_wieght'; did you mean 'blend_weight'? @ teachers[0]",
    ]


def test_unset_removes_keys_and_tables_before_set_applies(manager):
    raw = _raw()
    raw["loss"] = {"name": "sampled_reverse_kl", "ratio_log_cap": 5.0}
    raw["teachers"].append({"backend": "hf", "model": "u"})
    apply_overrides(raw, ["loss.name=topk_forward_kl", "loss.top_k=4"], unset=["loss.ratio_log_cap", "teachers.1"])
    assert raw["loss"] == {"name": "topk_forward_kl", "top_k": 4}
    assert parse_config(raw, manager).teachers == parse_config(_raw(loss__name="topk_forward_kl"), manager).teachers
    apply_overrides(raw, ["loss.name=sampled_reverse_kl"], unset=["loss"])
    assert raw["loss"] == {"name": "sampled_reverse_kl"}
    with pytest.raises(ConfigError) as err:
        apply_overrides(raw, [], unset=["loss.ratio_log_cap", "teachers.3", "student.model.x"])
    assert err.value.problems == [
        "no key 'loss.ratio_log_cap' to unset @ --unset",
        "no key 'teachers.3' to unset @ --unset",
        "no key 'student.model.x' to unset @ --unset",
    ]


def test_cli_unset_and_debug(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[student]\nmodel = "s"\n[data]\ntrain = "t"\n[[teachers]]\nmodel = "t"\n[train]\nlerning_rate = 1.0\n')

    def validate(*args):
        return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True)

    typo = validate("validate", str(config), "--unset", "train.steps")
    assert typo.returncode == 2
    assert typo.stderr == f"distill-run: 1 config error(s) in {config}:\n  - no key 'train.steps' to unset @ --unset\n"
    unset = validate("validate", str(config), "--unset", "train", "--set", "train.learning_rate=0")
    assert unset.returncode == 2
    assert unset.stderr.splitlines()[1:] == ["  - must be > 0, got 0.0 @ train.learning_rate"]
    debug = validate("--debug", "validate", str(config))
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().endswith("unknown key 'lerning_rate'; did you mean 'learning_rate'? @ train")
    folder = validate("validate", str(tmp_path))
    assert (folder.returncode, folder.stderr) == (2, f"distill-run: 1 config error(s):\n  - config file {tmp_path} is a folder; give the TOML file in it\n")


_TOML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_KEYS = [f"{section}.{field.name}" for section, cls in (
    ("student", StudentConfig), ("data", DataConfig), ("train", TrainConfig), ("sampling", SamplingConfig),
    ("eval", EvalConfig)) for field in attrs.fields(cls)] + [
    "output_dir", "seed", "teachers", "teachers.0.backend", "teachers.0.model", "teachers.0.batch_size",
    "teachers.0.blend_weight", "loss", "loss.name", "loss.top_k", "router.name", "metrics.sinks", "metrics.jsonl",
    "checkpoint.every_steps", "sampler.batch_size", "train", "nonsense"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # parsing never mutates it
@given(changes=st.dictionaries(st.sampled_from(_KEYS), _TOML_VALUES, min_size=1, max_size=3))
def test_any_value_of_any_field_parses_or_is_a_config_error_with_a_path(manager, changes):
    raw = _raw()
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if not isinstance(node, (dict, list)) or (isinstance(node, list) and not node):
                break
        else:
            if isinstance(node, dict):
                node[leaf] = value
    try:
        parse_config(raw, manager)
    except ConfigError as err:
        assert err.problems and all(" @ " in problem for problem in err.problems), err.problems
