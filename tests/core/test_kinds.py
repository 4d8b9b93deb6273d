"""A new component kind is a hookspec, a spec class, a config class and one row of the kinds table:
with nothing else changed it loads, configures, builds, lists and is held to the docs."""

import json
from pathlib import Path
from typing import Any, Protocol

import attrs
import pytest

from distill import ComponentSpec, hookimpl
from distill.cli import _plugins
from distill.config import RunConfig, parse_config
from distill.errors import ConfigError, PluginError
from distill.hookspecs import hookspec
from distill.kinds import REGISTRY, Kind
from distill.manager import PluginManager

from ..conftest import documentation_gaps

DOCS = Path(__file__).resolve().parents[2] / "docs"


class ToySpecs:
    @hookspec
    def distill_toys() -> list:
        """Register toys, selected by ``[toy] name = NAME``.

        Example::

            @hookimpl
            def distill_toys():
                return [ToySpec(name="ball", summary="...", factory=Ball)]
        """


@attrs.frozen(kw_only=True)
class ToySpec(ComponentSpec):
    """A toy."""


@attrs.frozen(kw_only=True)
class ToyConfig:
    name: str = "ball"
    colour: str = "red"
    options: Any = None


ToyRunConfig = attrs.make_class(
    "ToyRunConfig", {"toy": attrs.field(type=ToyConfig, factory=ToyConfig, kw_only=True)},
    bases=(RunConfig,), frozen=True, kw_only=True,
)


class Toy(Protocol):
    def play(self) -> str: ...


@attrs.frozen(kw_only=True)
class BallOptions:
    bounce: int = 1


class Ball:
    def __init__(self, options):
        self.options = options

    def play(self):
        return "bounce" * self.options.bounce


class ToyPlugin:
    @hookimpl
    def distill_toys(self):
        return [ToySpec(name="ball", summary="A ball.", config_cls=BallOptions, factory=lambda o, c: Ball(o)),
                ToySpec(name="broken", summary="Builds nothing playable.", factory=lambda o, c: object())]


@pytest.fixture
def toy_manager():
    row = Kind(name="toy", hook="distill_toys", spec_cls=ToySpec, config_cls=ToyConfig, protocol=Toy,
               section="toy", selector="name")
    manager = PluginManager(registry=REGISTRY.extended(row, ToyRunConfig, ToySpecs))
    manager.register(ToyPlugin(), name="toys")
    return manager


RAW = {"student": {"model": "s"}, "data": {"train": "t.jsonl"}, "teachers": [{"backend": "hf", "model": "t"}]}


def test_a_new_kind_is_configured_with_its_options_and_errors_carry_paths(toy_manager):
    config = parse_config({**RAW, "toy": {"name": "ball", "colour": "blue", "bounce": 3}}, toy_manager)
    assert config.toy == ToyConfig(name="ball", colour="blue", options=BallOptions(bounce=3))
    assert parse_config(RAW, toy_manager).toy.options == BallOptions()
    with pytest.raises(ConfigError) as err:
        parse_config({**RAW, "toy": {"name": "kite", "size": 1}}, toy_manager)
    assert err.value.problems == ["Unknown toy 'kite'. Available: ball, broken. @ toy.name"]
    with pytest.raises(ConfigError) as err:
        parse_config({**RAW, "toy": {"bounce": "high"}}, toy_manager)
    assert err.value.problems == ["must be int, got 'high' @ toy.bounce"]


def test_a_new_kind_is_built_and_held_to_its_protocol(toy_manager):
    config = parse_config({**RAW, "toy": {"bounce": 2}}, toy_manager)
    assert toy_manager.build("toy", "ball", config.toy.options, None).play() == "bouncebounce"
    with pytest.raises(PluginError) as err:
        toy_manager.build("toy", "broken", None, None)
    assert str(err.value) == (
        "toy 'broken' from plugin 'toys' (registered in-process) built a object without `play`. "
        "Subclass distill.Toy for the optional members' defaults and implement the rest."
    )


def test_a_new_kind_is_listed_and_must_be_documented(toy_manager, capsys):
    _plugins(toy_manager, as_json=True)
    listed = {info["name"]: info["components"] for info in json.loads(capsys.readouterr().out)}
    assert listed["toys"] == [{"kind": "toy", "name": "ball"}, {"kind": "toy", "name": "broken"}]
    assert documentation_gaps(toy_manager, DOCS) == [
        "plugins.md has no '### distill_toys' section",
        "configuration.md does not document ToyRunConfig.toy",
        "configuration.md does not document ToyConfig.colour",
        "docs/ does not document BallOptions.bounce",
    ]
