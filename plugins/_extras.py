"""What the built-in sinks behind optional extras share: the config-time check that the extra is
installed, so a missing library is a config error naming the pip command, not a crash mid-run."""

from __future__ import annotations

import importlib.util

__all__ = ["missing_extra"]


def missing_extra(module: str, extra: str, path: str) -> list[str]:
    """``[]`` when ``module`` can be imported, else the problem, with what to install."""
    if importlib.util.find_spec(module) is not None:
        return []
    return [(f"the {extra} sink needs the {module} package, which is not installed: "
             f"pip install 'distill[{extra}]' @ {path}")]
