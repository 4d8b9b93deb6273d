"""Built-in plugin ``checkpoint_local``: atomic step directories on the local filesystem.

Each checkpoint is written to a hidden temporary directory and renamed into place, so a run killed
at any moment leaves only complete checkpoints (``step-00000040/``) behind. Layout::

    checkpoints/step-00000040/model/            Hugging Face weights + tokenizer
    checkpoints/step-00000040/trainer_state.pt  optimizer, scheduler, RNG states
    checkpoints/step-00000040/loop_state.json   step, dataset cursor, counters
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import attrs

from distill import (
    BuildContext,
    Checkpoint,
    CheckpointBackend,
    CheckpointBackendSpec,
    CheckpointError,
    hookimpl,
    positive,
)

__all__ = ["LocalCheckpointOptions", "LocalCheckpoints"]

_STEP_DIR = re.compile(r"^step-(\d{8})$")


@attrs.frozen(kw_only=True)
class LocalCheckpointOptions:
    keep_last: int = attrs.field(default=2, validator=positive)
    directory: str | None = None


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target`` atomically, displacing an older ``target`` only after."""
    if target.exists():
        trash = target.with_name(f".trash-{target.name}-{os.getpid()}")
        os.replace(target, trash)
        os.replace(tmp, target)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, target)


class LocalCheckpoints(CheckpointBackend):
    def __init__(self, root: Path, final_dir: Path, keep_last: int) -> None:
        self.root = root
        self.final_dir = final_dir
        self.keep_last = keep_last

    @classmethod
    def build(cls, options: LocalCheckpointOptions, context: BuildContext) -> LocalCheckpoints:
        root = Path(options.directory) if options.directory else context.output_dir / "checkpoints"
        return cls(root, context.output_dir / "final", options.keep_last)

    def _complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(
            int(m.group(1)) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
        )

    def _temp(self, name: str) -> Path:
        """A fresh temporary directory; leftovers of runs killed mid-write are removed first."""
        if self.root.is_dir():
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir(parents=True)
        return tmp

    def save(
        self,
        step: int,
        *,
        model: Any,
        tokenizer: Any,
        trainer_state: dict[str, Any],
        loop_state: dict[str, Any],
    ) -> str:
        import torch

        name = f"step-{step:08d}"
        tmp = self._temp(name)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "loop_state.json").write_text(json.dumps(loop_state, indent=1), encoding="utf-8")
        target = self.root / name
        _replace_dir(tmp, target)
        for old in self._complete_steps()[: -self.keep_last]:
            shutil.rmtree(self.root / f"step-{old:08d}", ignore_errors=True)
        return str(target)

    def latest(self) -> Checkpoint | None:
        import torch

        steps = self._complete_steps()
        if not steps:
            return None
        path = self.root / f"step-{steps[-1]:08d}"
        try:
            loop_state = json.loads((path / "loop_state.json").read_text(encoding="utf-8"))
            trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"Checkpoint {path} cannot be read ({exc}). Delete it to resume from the one before."
            ) from exc
        return Checkpoint(
            step=steps[-1],
            uri=str(path),
            model_dir=str(path / "model"),
            trainer_state=trainer_state,
            loop_state=loop_state,
        )

    def save_final(self, *, model: Any, tokenizer: Any) -> str:
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.final_dir.with_name(f".tmp-final-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, self.final_dir)
        return str(self.final_dir)


@hookimpl
def distill_checkpoint_backends() -> list[CheckpointBackendSpec]:
    return [
        CheckpointBackendSpec(
            name="local",
            summary="Atomic step directories under <output_dir>/checkpoints, keep-last-N.",
            config_cls=LocalCheckpointOptions,
            factory=LocalCheckpoints.build,
        )
    ]
