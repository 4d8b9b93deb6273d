"""The docs keep up with the code, read from the code itself: every hook with each of its arguments,
every field of every config and options class (the kinds table says which exist); the files, test
module and ``distill-run plugins`` listings the guides show are the real ones, and run."""

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from distill import hookspecs
from distill.cli import main
from distill.kinds import REGISTRY
from distill.manager import PluginManager

from .conftest import documentation_gaps

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
THIRD_PARTY = REPO / "tests" / "third_party_plugin"
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


def _blocks(text: str, language: str = "") -> list[str]:
    """The fenced code blocks of ``text`` in ``language`` (``""``: unlabelled), in order."""
    blocks, lines, fence = [], None, ""
    for line in text.splitlines(keepends=True):
        if line.startswith("```") and lines is None:
            lines, fence = [], line[3:].strip()
        elif line.startswith("```"):
            if fence == language:
                blocks.append("".join(lines))
            lines = None
        elif lines is not None:
            lines.append(line)
    return blocks


def _page(name: str) -> str:
    return (DOCS / name).read_text()


def _listing(text: str) -> dict[str, list[str]]:
    """``distill-run plugins`` output by plugin header line, each with its component lines."""
    sections: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.startswith(" "):
            components = sections.setdefault(line, [])
        else:
            components.append(line)
    return sections


def test_the_guides_example_package_is_the_real_one():
    source = (THIRD_PARTY / "distill_uniform_teacher" / "__init__.py").read_text()
    after_docstring = "".join(source.splitlines(keepends=True)[ast.parse(source).body[0].end_lineno:]).lstrip()
    assert after_docstring in _blocks(_page("plugins.md"), "python")
    assert (THIRD_PARTY / "pyproject.toml").read_text() in _blocks(_page("plugins.md"), "toml")
    entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["distill.plugins"]
    shown = "".join(f'{name} = "{value}"\n' for name, value in entry_points.items())
    assert f'[project.entry-points."distill.plugins"]\n{shown}' in _blocks(_page("plugins.md"), "toml")


def test_the_guides_test_module_passes_as_written(tmp_path):
    guide = _page("plugins.md")
    (tmp_path / "test_guide.py").write_text(_blocks(guide[guide.index("## Testing a plugin"):], "python")[0])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_guide.py"],
                          cwd=tmp_path, env={"PYTHONPATH": str(THIRD_PARTY), "PATH": ""}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "\n3 passed" in proc.stdout, proc.stdout + proc.stderr


def test_the_cli_guides_listing_is_what_distill_run_plugins_prints(capsys):
    assert main(["plugins"]) == 0
    printed = {header: lines for header, lines in _listing(capsys.readouterr().out).items() if " (distill " in header}
    (shown,) = [block for block in _blocks(_page("cli.md")) if block.startswith("$ distill-run plugins\n")]
    assert _listing(shown.removeprefix("$ distill-run plugins\n")) == printed


@pytest.fixture
def uniform_installed(tmp_path, monkeypatch):
    """The example package as an installed distribution: dist-info with its entry point, on sys.path."""
    project = tomllib.loads((THIRD_PARTY / "pyproject.toml").read_text())["project"]
    info = tmp_path / f"distill_uniform_teacher-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("[distill.plugins]\nuniform = distill_uniform_teacher\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(THIRD_PARTY))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("distill_uniform_teacher", None)


def test_the_plugin_guides_listing_is_what_distill_run_plugins_prints(uniform_installed, capsys):
    assert main(["plugins"]) == 0
    printed = _listing(capsys.readouterr().out)
    (shown,) = [block for block in _blocks(_page("plugins.md")) if block.startswith("$ distill-run plugins\n...\n")]
    for header, lines in _listing(shown.removeprefix("$ distill-run plugins\n...\n")).items():
        assert printed.get(header) == lines, header
