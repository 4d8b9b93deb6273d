"""The docs keep up with the code, read from the code itself: every hook with each of its arguments,
every field of every config and options class (the kinds table says which exist)."""

from pathlib import Path

import pytest

from distill import hookspecs
from distill.kinds import REGISTRY
from distill.manager import PluginManager

from .conftest import documentation_gaps

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("distill_"))


def test_every_hook_every_argument_and_every_config_field_is_documented():
    assert documentation_gaps(PluginManager(), DOCS) == []


def test_the_kinds_table_and_the_hookspecs_agree():
    registration = {kind.hook for kind in REGISTRY.kinds}
    assert registration <= set(HOOKS)
    assert set(HOOKS) - registration == {"distill_select_loss_kernel", "distill_on_step_end",
                                         "distill_on_checkpoint_saved"}


@pytest.mark.parametrize("hook", HOOKS)
def test_hookspecs_are_documented_in_code(hook):
    assert "Example::" in (getattr(hookspecs, hook).__doc__ or ""), f"{hook} has no example in its docstring"
