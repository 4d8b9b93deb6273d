"""Built-in plugin ``checkpoint_local``: atomic, checksummed step directories on the local filesystem.

Each checkpoint is written to a hidden temporary directory, sealed with a ``SHA256SUMS`` manifest
written last, and renamed into place, so a run killed at any moment leaves only complete
checkpoints (``step-00000040/``) behind. Resuming verifies the manifest, so a file damaged after
it was written (truncated, bits flipped) stops the run with its name instead of being trained on;
``fallback = "previous"`` resumes from the newest intact checkpoint instead. Layout::

    checkpoints/step-00000040/model/            Hugging Face weights (a LoRA run's: the adapter) + tokenizer
    checkpoints/step-00000040/sharded/          a run sharded over processes: model and optimizer state,
                                                each process's share (torch.distributed.checkpoint)
    checkpoints/step-00000040/trainer_state.pt  optimizer (unsharded runs), scheduler, RNG states
    checkpoints/step-00000040/loop_state.json   step, dataset cursor, counters, the run's config
    checkpoints/step-00000040/SHA256SUMS        sha256 of every other file (``sha256sum -c`` reads it)

Temporaries are named after the process writing them (``.tmp-step-00000040-<pid>``, the main
process's under torchrun); a run removes those whose process is gone, never a live one's. A sharded
checkpoint reloads under any number of processes: torch.distributed.checkpoint reshards it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import attrs
import structlog

from distill import (
    SHARDED,
    BuildContext,
    Checkpoint,
    CheckpointBackend,
    CheckpointBackendSpec,
    CheckpointError,
    distributed,
    folder_problems,
    hookimpl,
    positive,
)

__all__ = ["LocalCheckpointOptions", "LocalCheckpoints", "MANIFEST"]

log = structlog.get_logger("distill")

MANIFEST = "SHA256SUMS"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@attrs.frozen(kw_only=True)
class LocalCheckpointOptions:
    keep_last: int = attrs.field(default=2, validator=positive)
    directory: str | None = None
    fallback: Literal["none", "previous"] = "none"


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target`` atomically, displacing an older ``target`` only after."""
    if target.exists():
        trash = target.with_name(f".trash-{target.name}-{os.getpid()}")
        os.replace(target, trash)
        os.replace(tmp, target)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, target)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_leftovers(folder: Path, target: str) -> None:
    """Remove the temporaries that writers of ``target`` (a regex) left when they died mid-write;
    a live process's (another run's, or this one's) are not ours to touch."""
    pattern = re.compile(rf"^\.(?:tmp|trash)-{target}-(\d+)$")
    for path in folder.glob(".*") if folder.is_dir() else ():
        if (match := pattern.match(path.name)) and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
        os.fsync(file.fileno())  # on disk before the rename publishes it (a no-op when verifying)
    return digest


def _seal(folder: Path) -> None:
    """Write the manifest of every file in ``folder``, last: what it lists is complete."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    lines = "".join(f"{_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)
    (folder / MANIFEST).write_text(lines, encoding="utf-8")


def _damage(folder: Path) -> str | None:
    """What in ``folder`` differs from its manifest, or None when every file matches."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        # also a checkpoint of a distill older than the manifests: its loop state is older too, so
        # it cannot resume here either
        return f"{MANIFEST} is missing (cut short, or written by an older distill that did not seal checkpoints)"
    for number, line in enumerate(manifest.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep:
            return f"{MANIFEST} line {number} is not '<sha256>  <file>'"
        if not (folder / name).is_file():
            return f"{name} is missing"
        if _sha256(folder / name) != digest:
            return f"{name} does not match its sha256 in {MANIFEST} (truncated or altered since it was written)"
    return None


class LocalCheckpoints(CheckpointBackend):
    def __init__(self, root: Path, final_dir: Path, keep_last: int,
                 fallback: Literal["none", "previous"] = "none") -> None:
        self.root = root
        self.final_dir = final_dir
        self.keep_last = keep_last
        self.fallback = fallback

    @classmethod
    def build(cls, options: LocalCheckpointOptions, context: BuildContext) -> LocalCheckpoints:
        root = Path(options.directory) if options.directory else context.output_dir / "checkpoints"
        return cls(root, context.output_dir / "final", options.keep_last, options.fallback)

    def _complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(
            int(m.group(1)) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
        )

    def _temp(self, folder: Path, name: str) -> Path:
        """A fresh temporary directory for ``name``, after removing dead runs' leftovers."""
        _remove_leftovers(self.root, r"step-\d{8}")
        _remove_leftovers(self.final_dir.parent, re.escape(self.final_dir.name))
        tmp = folder / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from a save that failed
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
        import torch.distributed.checkpoint as dcp

        name = f"step-{step:08d}"
        tmp = distributed.from_main(self._temp(self.root, name) if distributed.is_main() else None)
        if SHARDED in trainer_state:  # every process writes its share; DCP's last collective commits them
            dcp.save(trainer_state[SHARDED], checkpoint_id=tmp / SHARDED, no_dist=not distributed.sharded())
            trainer_state = {key: value for key, value in trainer_state.items() if key != SHARDED}
        if not distributed.is_main():
            return distributed.from_main(None)
        if model is not None:
            model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "loop_state.json").write_text(json.dumps(loop_state, indent=1), encoding="utf-8")
        _seal(tmp)
        target = self.root / name
        _replace_dir(tmp, target)
        # steps after this one belong to a trajectory a fallback abandoned
        steps = self._complete_steps()
        kept = [s for s in steps if s <= step][-self.keep_last :]
        for old in set(steps) - set(kept):
            shutil.rmtree(self.root / f"step-{old:08d}", ignore_errors=True)
        return distributed.from_main(str(target))

    def _read(self, step: int) -> Checkpoint:
        """The verified checkpoint of ``step``, or a CheckpointError naming it and what is damaged."""
        import torch

        path = self.root / f"step-{step:08d}"
        problem = _damage(path)
        if problem is None:
            try:
                loop_state = json.loads((path / "loop_state.json").read_text(encoding="utf-8"))
                trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
            except (OSError, ValueError, RuntimeError) as exc:
                problem = f"it cannot be read ({exc})"
        if problem is not None:
            raise CheckpointError(f"Checkpoint {path} is damaged: {problem}.")
        if (path / SHARDED).is_dir():
            trainer_state[SHARDED] = functools.partial(_load_sharded, path / SHARDED)
            return Checkpoint(step=step, uri=str(path), model_dir=None, trainer_state=trainer_state,
                              loop_state=loop_state)
        return Checkpoint(step=step, uri=str(path), model_dir=str(path / "model"),
                          trainer_state=trainer_state, loop_state=loop_state)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint, verified; with ``fallback = "previous"`` the newest intact one."""
        steps = self._complete_steps()
        for step in reversed(steps):
            try:
                return self._read(step)
            except CheckpointError as exc:
                if self.fallback == "none":
                    advice = ('Delete it to resume from the one before, or set checkpoint.fallback = "previous" '
                              "to do that by itself." if step > steps[0] else "Delete it to start afresh.")
                    raise CheckpointError(f"{exc} {advice}") from None
                log.warning("damaged checkpoint skipped, trying the one before", problem=str(exc))
        if steps:
            raise CheckpointError(f"Every checkpoint under {self.root} is damaged (see the warnings above). "
                                  f"Delete them to start afresh, or choose another output_dir.")
        return None

    def save_final(self, *, model: Any, tokenizer: Any, adapter: Any | None = None) -> str:
        tmp = self._temp(self.final_dir.parent, self.final_dir.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if adapter is not None:
            adapter.save_pretrained(tmp / "adapter")
        _seal(tmp)
        _replace_dir(tmp, self.final_dir)
        return str(self.final_dir)


def _load_sharded(folder: Path, state: dict[str, Any]) -> None:
    """Fill ``state`` (state dicts shaped like the ones saved) from ``folder``, resharded (in one
    process, into whole tensors: DCP then warns that it assumes so, which is what we mean)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=folder, no_dist=not distributed.sharded())


def _check(options: LocalCheckpointOptions, context: BuildContext) -> list[str]:
    """A directory that cannot be written would fail at the first save, after steps of work."""
    return folder_problems(options.directory, f"{context.path}.directory") if options.directory else []


@hookimpl
def distill_checkpoint_backends() -> list[CheckpointBackendSpec]:
    return [
        CheckpointBackendSpec(
            name="local",
            summary="Atomic step directories under <output_dir>/checkpoints, keep-last-N.",
            config_cls=LocalCheckpointOptions,
            factory=LocalCheckpoints.build,
            check=_check,
        )
    ]
