"""The docs keep up with the code: every hook and every config field has its place."""

import re
from pathlib import Path

import attrs
import pytest

from distill import config, hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("distill_"))


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_reference_section(hook):
    headings = re.findall(r"^### `?(\w+)`?", (DOCS / "plugins.md").read_text(), flags=re.MULTILINE)
    assert hook in headings, f"docs/plugins.md has no '### {hook}' section"


def test_hookspecs_are_documented_in_code():
    for hook in HOOKS:
        doc = getattr(hookspecs, hook).__doc__ or ""
        assert "Example::" in doc, f"{hook} has no example in its docstring"


SECTIONS = [config.RunConfig, config.StudentConfig, config.SamplingConfig, config.DataConfig,
            config.TrainConfig, config.EvalConfig, config.TeacherConfig, config.LossConfig,
            config.CheckpointConfig, config.MetricsConfig, config.RouterConfig, config.SamplerConfig]


@pytest.mark.parametrize("section", SECTIONS, ids=lambda cls: cls.__name__)
def test_every_config_field_is_documented(section):
    text = (DOCS / "configuration.md").read_text()
    for field in attrs.fields(section):
        if field.name in ("options", "source"):
            continue
        assert f"`{field.name}`" in text, f"docs/configuration.md does not document {section.__name__}.{field.name}"
