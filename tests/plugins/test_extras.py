"""A sink behind an optional extra that is not installed is a config error naming the pip command,
found before anything runs (no extra needs to be installed for this test)."""

import sys

import pytest

from distill.errors import ConfigError

from ..e2e.test_observability import _config


@pytest.mark.parametrize("sink", ["tensorboard", "mlflow", "wandb"])
def test_without_the_extra_the_config_says_what_to_install(tmp_path, tiny_models, manager, monkeypatch, sink):
    monkeypatch.setitem(sys.modules, sink, None)  # what importlib sees when it is not installed
    with pytest.raises(ConfigError) as error:
        _config(tmp_path, manager, tiny_models, f"metrics.sinks=['jsonl', '{sink}']")
    assert error.value.problems == [(f"the {sink} sink needs the {sink} package, which is not installed: "
                                     f"pip install 'distill[{sink}]' @ metrics.{sink}")]


def test_the_core_install_and_its_imports_pull_no_optional_library():
    import subprocess
    import tomllib
    from pathlib import Path

    optional = {"tensorboard", "wandb", "mlflow", "matplotlib", "peft"}
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    required = {dep.split(">")[0].split("=")[0].split("[")[0].strip().lower() for dep in project["dependencies"]}
    assert not {name for name in required if any(lib in name for lib in optional)}
    assert {"tensorboard", "wandb", "mlflow", "report", "lora"} <= set(project["optional-dependencies"])
    probe = ("import sys; import distill.cli, distill.plots, distill.plugins.tensorboard, distill.plugins.mlflow, "
             "distill.plugins.wandb, distill.plugins.torch_trainer; from distill.manager import PluginManager; "
             "PluginManager().components('metric_sink'); PluginManager().components('trainer'); "
             f"print(sorted(set({sorted(optional)!r}) & {{m.split('.')[0] for m in sys.modules}}))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"
