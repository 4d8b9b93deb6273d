"""The recipe: strict on-policy distillation, one explicit loop.

Each step: take ``prompt_groups_per_step`` rows, sample ``completions_per_prompt`` completions per
row with the current weights, route each row to its teacher, score exactly the sampled tokens,
build the aligned batch, take one optimizer step, sync weights to the sampler, record metrics,
checkpoint and evaluate when due. Deterministic for a seed on CPU; resumable bit for bit.

:class:`Recipe` has a fixed shape: ``setup`` (build components, load data, resume), ``train``
(the loop), ``save_checkpoint`` and ``cleanup``. What it reports lives in :mod:`distill.report`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import attrs
import structlog
import torch

from distill import distributed
from distill.align import build_token_batch
from distill.config import (
    RunConfig,
    config_context,
    converter,
    display_config,
    resolve_path,
    trajectory_changes,
)
from distill.data import DataCursor, Dataset, derive_seed, load_dataset, sample_seed
from distill.errors import CheckpointError, ConfigError, DistillError
from distill.evaluate import evaluate, teacher_accuracy
from distill.manager import PluginManager
from distill.preflight import preflight, prompt_token_limit
from distill.protocols import Checkpoint, CheckpointBackend, LossKernel, Sampler, Trainer
from distill.report import Progress, summary
from distill.scoring import TeacherBook, TeacherPool
from distill.sinks import MetricSinks
from distill.status import RunStatus
from distill.types import BuildContext, PromptRow, Rollout, RunInfo, TeacherScores

__all__ = ["run", "Recipe", "RunInterrupted", "Resume", "PhaseClock"]

log = structlog.get_logger("distill")

Resume = Literal["auto", "always", "never", "anyway"]  # anyway: always, even with a changed trajectory


class RunInterrupted(DistillError):
    """The run was asked to stop (SIGTERM / Ctrl-C) and saved a checkpoint first."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _lock_output_dir(config: RunConfig) -> IO[str]:
    """Hold ``output_dir/.lock`` for as long as the run lasts: two runs into one folder would
    interleave their metrics and checkpoints. The OS drops the lock when the process ends, however
    it ends (SIGKILL included), so there is never a stale lock to clean up."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = (output_dir / ".lock").open("a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"  # empty if it took the lock this very moment
        lock.close()
        raise ConfigError([f"{output_dir} is in use by another run (PID {holder}); wait for it to end or "
                           f"stop it, or choose another output_dir (--set output_dir=...) @ output_dir"],
                          config.source) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


class PhaseClock:
    """Wall time per phase, accumulated across resumes."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.last: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.last[name] = elapsed
            self.totals[name] = self.totals.get(name, 0.0) + elapsed

    def state_dict(self) -> dict[str, float]:
        return dict(self.totals)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.totals = dict(state)


class _StopFlag:
    """Turns SIGTERM / SIGINT into a request to stop after the current step."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = signal.Signals(signum).name
        self.signum = signum
        log.warning("stop requested, finishing the step and saving a checkpoint", signal=self.requested)

    def agree(self) -> bool:
        """Whether any process was asked to stop; if so every process stops alike, at this step."""
        asked = [(name, signum) for name, signum in distributed.gather((self.requested, self.signum)) if name]
        if asked and self.requested is None:
            self.requested, self.signum = asked[0]
        return bool(asked)

    def raise_if_requested(self, when: str) -> None:
        if self.requested is not None:
            raise RunInterrupted(
                f"Stopped by {self.requested} {when}. Run the same command again to resume.", self.signum
            )

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@attrs.frozen(eq=False)
class _Scored:
    """One step's rollouts as sampled, the ones teachers scored with their targets, and what
    scoring counted (added to the run's totals when the step trains, not when it is prefetched)."""

    rollouts: list[Rollout]
    kept: list[Rollout]
    scores: list[TeacherScores]
    books: dict[str, TeacherBook]
    skipped: Counter[str]


def _rollouts_state(rollouts: Sequence[Rollout]) -> list[dict[str, Any]]:
    """Rollouts as JSON: the row's line number, ids, both logprobs (float32 survives the round trip)."""
    return [{"line": r.row.index, "ids": r.completion_ids_C.tolist(), "sampling": r.sampling_logprobs_C.tolist(),
             "model": r.model_logprobs_C.tolist(), "finished": r.finished} for r in rollouts]


def _split_anew(shares: Sequence[list[Any] | None], n: int) -> list[Any] | None:
    """This process's share of a step's rollouts that ``len(shares)`` processes sampled: process
    ``r`` of ``W`` held rows ``r, r + W, ...``, ``n`` rollouts per row, in order."""
    if shares[0] is None:
        return None
    rows = [[share[i:i + n] for i in range(0, len(share), n)] for share in shares]
    in_order = [rows[p % len(rows)][p // len(rows)] for p in range(sum(map(len, rows)))]
    return [rollout for _, row in distributed.my_share(in_order) for rollout in row]


def _rng_state() -> dict[str, Any]:
    """This process's random generators (dropout, LoRA dropout), as JSON."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    def tensor(encoded: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def _rollouts_from_state(state: Sequence[dict[str, Any]], rows: Sequence[PromptRow]) -> list[Rollout]:
    by_line = {row.index: row for row in rows}
    return [Rollout(row=by_line[r["line"]], completion_ids_C=torch.tensor(r["ids"], dtype=torch.long),
                    sampling_logprobs_C=torch.tensor(r["sampling"], dtype=torch.float32),
                    model_logprobs_C=torch.tensor(r["model"], dtype=torch.float32), finished=r["finished"])
            for r in state]


def _rollout_metrics(rollouts: Sequence[Rollout], scores: Sequence[TeacherScores]) -> dict[str, float]:
    """The step's rollout metrics, over every process's share."""
    student = torch.cat([torch.zeros(0), *(r.model_logprobs_C for r in rollouts)])  # a share may be empty
    teacher = torch.cat([torch.zeros(0), *(s.logprobs_C for s in scores)])
    sums = distributed.sum_values({"gap": float((student - teacher).sum()), "teacher": float(teacher.sum()),
                                   "tokens": student.numel(), "rollouts": len(rollouts),
                                   "truncated": sum(not r.finished for r in rollouts)})
    return {
        "reverse_kl": sums["gap"] / sums["tokens"],
        "teacher_logprob": sums["teacher"] / sums["tokens"],
        "completion_tokens": int(sums["tokens"]),
        "mean_completion_length": sums["tokens"] / sums["rollouts"],
        "truncated_fraction": sums["truncated"] / sums["rollouts"],
    }


def _merged_books(books: dict[str, TeacherBook]) -> dict[str, TeacherBook]:
    """Each teacher's books for the step, over every process's share."""
    merged: dict[str, TeacherBook] = {}
    for share in distributed.gather(books):
        for name, book in share.items():
            merged.setdefault(name, TeacherBook()).add(book)
    return merged


class Recipe:
    """One run: :meth:`setup`, then :meth:`train`, checkpoints by :meth:`save_checkpoint`, and
    :meth:`cleanup` however it ended. Every attribute is declared here; ``setup`` fills them in."""

    def __init__(self, config: RunConfig, manager: PluginManager, *, resume: Resume = "auto",
                 progress: bool | None = None) -> None:
        self.config = config
        self.manager = manager
        self.resume = resume
        self.progress = progress
        self.output_dir = Path(config.output_dir)
        self.info = RunInfo(config=config, output_dir=self.output_dir)
        self.context: BuildContext = config_context(config, manager)
        self.started = time.perf_counter()
        self.clock = PhaseClock()
        self.skipped: Counter[str] = Counter()
        self.eval_dropped: Counter[str] = Counter()  # eval completions no teacher scored, by reason
        self.step = 0
        self.started_from = 0
        self.tokens = 0
        self.evaluation: dict[str, Any] = {}
        self.wall_before = 0.0
        self.checkpoints: CheckpointBackend | None = None
        self.tokenizer: Any = None
        self.trainer: Trainer | None = None
        self.loss_kernel: str | None = None  # the kernel plugins chose for where the trainer computes
        self.sampler: Sampler | None = None
        self.pool: TeacherPool | None = None
        self.sinks = MetricSinks({})
        self.status: RunStatus | None = None  # written once the run holds its output folder
        self.train_data: Dataset | None = None
        self.eval_data: Dataset | None = None
        self.eval_rows: tuple[PromptRow, ...] = ()
        self.cursor: DataCursor | None = None
        # max_staleness = 1: the next step's rollouts, sampled and scored while this step trained
        # (or, right after a resume, as the checkpoint saved them, still to be scored)
        self.prefetched: _Scored | list[Rollout] | None = None
        self.lock: IO[str] | None = None

    def _build(self, kind: str, name: str, options: Any, path: str) -> Any:
        return self.manager.build(kind, name, options, attrs.evolve(self.context, path=path))

    # -- setup ----------------------------------------------------------------------------------

    def _latest_checkpoint(self) -> Checkpoint | None:
        checkpoint = self.checkpoints.latest()
        if checkpoint is not None and self.resume == "never":
            raise CheckpointError(
                f"{self.output_dir} already holds checkpoints (latest: step {checkpoint.step}). Resume "
                f"it, or choose another output_dir (--set output_dir=...) to start afresh."
            )
        if checkpoint is None and self.resume in ("always", "anyway"):
            raise CheckpointError(f"Nothing to resume: no complete checkpoint under {self.output_dir}.")
        return checkpoint

    def _check_trajectory(self, checkpoint: Checkpoint) -> None:
        """Refuse to continue a checkpoint under a config that changes what it trains (another
        seed, dataset, model, loss, ...: ``TRAJECTORY_FIELDS``), unless resumed ``anyway``."""
        changes = trajectory_changes(checkpoint.loop_state["config"], self.config)
        if not changes:
            return
        if self.resume == "anyway":
            log.warning("resuming a checkpoint under a config that changes its trajectory",
                        checkpoint=checkpoint.uri, changed={path: {"checkpoint": old, "now": new}
                                                            for path, (old, new) in changes.items()})
            return
        problems = [f"is {json.dumps(new)} in this config but {json.dumps(old)} in the checkpoint @ {path}"
                    for path, (old, new) in changes.items()]
        problems.append(
            f"{self.output_dir} holds checkpoint {checkpoint.uri} of a run with the value(s) above, which "
            f"change what it trains: rerun with them, choose another output_dir (--set output_dir=...), "
            f"or pass --resume-anyway to continue it with these @ output_dir"
        )
        raise ConfigError(problems, self.config.source)

    def _kernel_for(self, device: str, dtype: str) -> LossKernel:
        """The loss kernel for the trainer's device type and dtype (its factory asks, once)."""
        kernel = self.manager.select_loss_kernel(loss=self.config.loss.name, kernel=self.config.loss.kernel,
                                                 device=device, dtype=dtype)
        self.loss_kernel = kernel.name
        return kernel

    def _build_components(self, model_path: str) -> None:
        """The trainer first (it loads the student from ``model_path``), then what uses the student."""
        config = self.config
        self.context = attrs.evolve(self.context, tokenizer=self.tokenizer)
        objective = self._build("loss", config.loss.name, config.loss.options, "loss")
        self.trainer = self.manager.build("trainer", config.trainer.backend, config.trainer.options, attrs.evolve(
            self.context, path="trainer", student_path=model_path, objective=objective, kernel_for=self._kernel_for))
        model = self.trainer.model
        self.context = attrs.evolve(self.context, student=model)
        teachers: dict[str, Any] = {}
        shared: dict[str, Any] = {}  # teachers with the same backend and options share one instance
        for ref in self.context.teachers:
            identity = json.dumps([ref.backend, converter.unstructure(ref.options)], sort_keys=True, default=str)
            if identity not in shared:
                shared[identity] = self._build("teacher", ref.backend, ref.options, ref.path)
            teachers[ref.name] = shared[identity]
        self.sampler = self._build("sampler", config.sampler.backend, config.sampler.options, "sampler")
        self.pool = TeacherPool(
            teachers=teachers,
            refs={ref.name: ref for ref in self.context.teachers},
            router=self._build("router", config.router.name, config.router.options, "router"),
            blender=self._build("blender", config.blender.name, config.blender.options, "blender"),
            top_k=self.context.top_k,
            vocab_size=model.get_output_embeddings().weight.shape[0],
            hidden=self.context.teacher_signal == "hidden",
        )
        sinks = config.metrics.sinks if distributed.is_main() else ()  # the main process records for all
        self.sinks = MetricSinks({name: self._build("metric_sink", name, config.metrics.options[name],
                                                    f"metrics.{name}") for name in sinks})
        log.info("components", trainer=config.trainer.backend, loss=config.loss.name, kernel=self.loss_kernel,
                 router=config.router.name, teachers=sorted(teachers))

    def _load_data(self) -> None:
        config, tokenizer = self.config, self.tokenizer
        limit = prompt_token_limit(config, self.trainer.model.config)
        views = sorted({ref.prompt_key for ref in self.context.teachers})
        self.train_data = load_dataset(resolve_path(config.data.train, config), tokenizer,
                                       max_prompt_tokens=limit, teacher_messages_keys=views)
        if config.data.eval:
            self.eval_data = load_dataset(resolve_path(config.data.eval, config), tokenizer,
                                          max_prompt_tokens=limit, teacher_messages_keys=views)
            self.eval_rows = self.eval_data.rows[: config.eval.limit]
        for dataset in filter(None, (self.train_data, self.eval_data)):
            if dataset.skipped:
                log.warning("skipped dataset rows", path=dataset.path, by_reason=dataset.skipped,
                            first_line=dataset.first_skipped_line)
        self.cursor = DataCursor(len(self.train_data.rows), seed=config.seed, shuffle=config.data.shuffle)

    def setup(self) -> None:
        """Build every component once, load the data, and resume from the latest checkpoint."""
        config = self.config
        threads = config.train.threads or torch.get_num_threads()
        # Pipelined, sampling and training run at once in two threads: each gets half the budget.
        torch.set_num_threads(max(1, threads // 2) if config.train.max_staleness else threads)
        torch.manual_seed(config.seed)
        self.tokenizer = preflight(config, self.manager)  # before any file is written or model loaded
        if distributed.is_main():  # the one process that writes the run's files
            self.lock = _lock_output_dir(config)
            self.status = RunStatus(self.output_dir, config.train.steps)
            self.status.write("pending")
        distributed.barrier()  # the output folder is ours before any process reads checkpoints
        self.checkpoints = self._build("checkpoint_backend", config.checkpoint.backend,
                                       config.checkpoint.options, "checkpoint")
        checkpoint = self._latest_checkpoint()
        if checkpoint is not None:
            self._check_trajectory(checkpoint)
        # a sharded checkpoint's weights load into the student once built (its trainer state)
        resumed_weights = checkpoint.model_dir if checkpoint else None
        self._build_components(resumed_weights or resolve_path(config.student.model, config))
        if distributed.is_main():
            (self.output_dir / "config.json").write_text(json.dumps(display_config(config), indent=1),
                                                          encoding="utf-8")
        self._load_data()
        if checkpoint is not None:
            self.trainer.load_state_dict(checkpoint.trainer_state)
            self.load_state_dict(checkpoint.loop_state)
            log.info("resumed", step=checkpoint.step, checkpoint=checkpoint.uri)
        self.started_from = self.step
        self.sinks.resume_at(self.step)

    def state_dict(self) -> dict[str, Any]:
        """The loop's resumable state; each stateful component contributes its own. What differs by
        process (remote components' counters, prefetched rollouts, the random generators) is kept
        for every process: a collective, every process calls it."""
        prefetched = self.prefetched.rollouts if isinstance(self.prefetched, _Scored) else self.prefetched
        pool = self.pool.state_dict()
        own = {"teachers": pool["teachers"], "sampler": self.sampler.state_dict(),
               "prefetched": None if prefetched is None else _rollouts_state(prefetched), "rng": _rng_state()}
        return {"step": self.step, "tokens": self.tokens, "eval": self.evaluation, "wall_time_s": self.wall_time(),
                "cursor": self.cursor.state_dict(), "skipped": dict(self.skipped),
                "times": self.clock.state_dict(), "books": pool["books"], "processes": distributed.gather(own),
                "eval_dropped": dict(self.eval_dropped), "sinks": self.sinks.state_dict(),
                "config": display_config(self.config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Each process takes back its own part. Under another number of processes, the prefetched
        rollouts are split anew and process ``r`` takes old process ``r``'s counters (those of old
        processes beyond the new number are not carried); the generators start afresh."""
        self.step, self.tokens, self.evaluation = state["step"], state["tokens"], state["eval"]
        self.wall_before = state["wall_time_s"]
        self.cursor.load_state_dict(state["cursor"])
        self.skipped = Counter(state["skipped"])
        self.clock.load_state_dict(state["times"])
        self.eval_dropped = Counter(state["eval_dropped"])
        self.sinks.load_state_dict(state.get("sinks", {}))  # absent in checkpoints of older versions
        if "processes" not in state:  # written before the loop kept a part per process
            state = {**state, "books": state["teachers"]["books"], "processes": [
                {"teachers": state["teachers"]["teachers"], "sampler": state["sampler"],
                 "prefetched": state.get("prefetched"), "rng": None}]}
        processes = state["processes"]
        rank, same_world = distributed.rank(), len(processes) == distributed.world_size()
        if rank < len(processes):
            own = processes[rank]
            self.pool.load_state_dict({"books": state["books"], "teachers": own["teachers"]})
            self.sampler.load_state_dict(own["sampler"])
        else:
            self.pool.load_state_dict({"books": state["books"], "teachers": {}})
        if not same_world and distributed.is_main() and len(processes) > distributed.world_size():
            log.warning("resumed on fewer processes: the remote components' counters of the others are not carried",
                        processes_before=len(processes), processes_now=distributed.world_size())
        if same_world and processes[rank]["rng"] is not None:
            _set_rng_state(processes[rank]["rng"])
        prefetched = (processes[rank]["prefetched"] if same_world else
                      _split_anew([p["prefetched"] for p in processes], self.config.train.completions_per_prompt))
        if prefetched is not None:  # sampled by the weights before, so kept, not redrawn
            self.prefetched = _rollouts_from_state(prefetched, self.train_data.rows)

    # -- the recipe -----------------------------------------------------------------------------

    def route_of(self, row: PromptRow) -> str | None:
        """The row's route value (its ``route_key`` field), for per-route reports."""
        value = row.metadata.get(self.pool.router.route_key)
        return value if isinstance(value, str) else None

    async def _score_for_eval(self, rollouts: Sequence[Rollout]) -> tuple[list[Rollout], list[TeacherScores]]:
        dropped: Counter[str] = Counter()
        kept, targets, _ = await self.pool.score(rollouts, dropped, hidden=False)
        self.eval_dropped.update(distributed.summed(dropped))
        return kept, targets

    async def evaluate(self, step: int) -> dict[str, Any]:
        with self.clock.phase("eval"):
            result = await evaluate(self.sampler, self._score_for_eval, self.eval_rows,
                                    self.tokenizer, self.config, self.route_of)
        log.info("eval", step=step, accuracy=result["accuracy"], reverse_kl=result["reverse_kl"],
                 per_route=result.get("per_route"))
        self.sinks.write_eval(step, result)
        self.evaluation.setdefault("history", []).append({"step": step, **result})
        return result

    async def evaluate_before(self) -> None:
        """Teacher and student accuracy before training (once per run, kept across resumes)."""
        if not self.eval_rows or "before" in self.evaluation or not self.config.eval.at_start:
            return
        with self.clock.phase("eval"):
            by_teacher = await teacher_accuracy(self.pool, self.eval_rows, self.tokenizer, self.config)
        if len(self.pool.teachers) == 1:
            self.evaluation["teacher_accuracy"] = next(iter(by_teacher.values()), None)
        self.evaluation["teacher_accuracy_by_teacher"] = by_teacher
        self.evaluation["before"] = await self.evaluate(0)

    async def _score(self, rollouts: list[Rollout]) -> _Scored:
        skipped: Counter[str] = Counter()
        with self.clock.phase("teacher_scoring"):
            kept, scores, books = await self.pool.score(rollouts, skipped)
        return _Scored(rollouts, kept, scores, books, skipped)

    async def _sample_and_score(self, step: int) -> _Scored:
        """This process's share of step ``step``'s rows, sampled with the sampler's current weights
        (each row seeded by its position in the step, so any split samples alike), then scored."""
        config = self.config
        rows = [self.train_data.rows[i] for i in self.cursor.take(config.train.prompt_groups_per_step)]
        share = distributed.my_share(rows)
        step_seed = derive_seed(config.seed, step)
        params = config.sampling.params(n=config.train.completions_per_prompt)
        with self.clock.phase("sampling"):
            rollouts = await self.sampler.sample([row for _, row in share], params,
                                                 seeds=[sample_seed(step_seed, position) for position, _ in share])
        return await self._score(rollouts)

    def _train(self, batch: Any) -> dict[str, float]:
        with self.clock.phase("training"):
            return self.trainer.train_step(batch)

    async def train_step(self, step: int) -> dict[str, Any] | None:
        """Sample, score, train on one step's rows; None when no row could be scored.

        With ``max_staleness = 1`` the step trains on rollouts prefetched during the step before
        (sampled one update earlier: the importance ratio corrects for it) and, while it trains in
        a worker thread, samples and scores the next step's. At 0 every phase runs in turn.
        """
        config, clock = self.config, self.clock
        started = time.perf_counter()
        if self.prefetched is None:
            scored = await self._sample_and_score(step)
        elif isinstance(self.prefetched, _Scored):
            scored = self.prefetched
        else:  # rollouts a checkpoint kept
            scored = await self._score(self.prefetched)
        self.prefetched = None
        self.skipped.update(distributed.summed(scored.skipped))
        books = _merged_books(scored.books)
        self.pool.record(books)
        if not distributed.sum_values({"kept": len(scored.kept)})["kept"]:
            log.warning("no row of this step could be scored", step=step, skipped=dict(self.skipped))
            return None
        # sharded, a process whose whole share failed still takes part in the step, adding nothing
        batch = build_token_batch(scored.kept, scored.scores, pad_id=self.tokenizer.pad_token_id or 0) \
            if scored.kept else None
        if config.train.max_staleness and step < config.train.steps:
            train_metrics, self.prefetched = await asyncio.gather(
                asyncio.to_thread(self._train, batch), self._sample_and_score(step + 1)
            )
        else:
            train_metrics = self._train(batch)
        with clock.phase("weight_sync"):
            await self.sampler.sync_weights(step)
        rollout_metrics = _rollout_metrics(scored.kept, scored.scores)
        tokens = rollout_metrics["completion_tokens"]
        self.tokens += tokens
        elapsed = time.perf_counter() - started
        return {
            **train_metrics,
            **rollout_metrics,
            "route_skips_total": sum(self.skipped.values()),
            **{f"teacher/{name}/{key}": value for name, book in books.items()
               for key, value in book.as_dict().items()},
            **{f"time_{phase}_s": clock.last.get(phase, 0.0)  # pipelined: the overlapped prefetch's
               for phase in ("sampling", "teacher_scoring", "training", "weight_sync")},
            "time_step_s": elapsed,
            "tokens_per_s": tokens / elapsed,
        }

    def record(self, step: int, metrics: dict[str, Any]) -> None:
        self.sinks.write(step, metrics)
        self.manager.on_step_end(run=self.info, step=step, metrics=metrics)

    def save_checkpoint(self) -> None:
        """Every process saves (sharded, each writes its share of the trainer's state)."""
        with self.clock.phase("checkpoint"):
            uri = self.checkpoints.save(
                self.step, model=self.trainer.checkpoint_model(), tokenizer=self.tokenizer,
                trainer_state=self.trainer.state_dict(), loop_state=self.state_dict(),
            )
        self.manager.on_checkpoint_saved(run=self.info, step=self.step, uri=uri)
        log.info("checkpoint", step=self.step, uri=uri)

    def wall_time(self) -> float:
        """Wall time of this run, including earlier attempts it resumed from."""
        return self.wall_before + time.perf_counter() - self.started

    async def train(self) -> dict[str, Any]:
        """The loop, from the step after the last checkpoint to the end; returns the summary."""
        config = self.config
        every_eval, every_save = config.eval.every_steps, config.checkpoint.every_steps
        if self.status is not None:
            self.status.write("running", step=self.started_from, tokens=self.tokens)
        with _StopFlag() as stop:
            with self.clock.phase("weight_sync"):
                await self.sampler.sync_weights(self.started_from)  # a remote server may hold others
            await self.evaluate_before()
            stop.raise_if_requested("before training started")
            progress_shown = self.progress if distributed.is_main() else False
            with Progress(config.train.steps, self.started_from, enabled=progress_shown) as progress:
                for step in range(self.started_from + 1, config.train.steps + 1):
                    metrics = await self.train_step(step)
                    self.step = step
                    if metrics is not None:
                        self.record(step, metrics)
                    progress.advance(step, metrics)
                    if self.status is not None:
                        self.status.advance(step, self.tokens)
                    if self.eval_rows and every_eval and step % every_eval == 0 and step < config.train.steps:
                        await self.evaluate(step)
                    stopping = stop.agree()
                    if stopping or step == config.train.steps or (every_save and step % every_save == 0):
                        self.save_checkpoint()
                    stop.raise_if_requested(f"after step {step}; the checkpoint is saved")
            if not self.tokens:  # a final model would be the untrained student
                reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
                raise DistillError(f"Every step was skipped: no row could be scored ({reasons or 'no reason recorded'}). "
                                   f"Fix what the reasons name and run again with a fresh output_dir.")
            if self.eval_rows:
                self.evaluation["after"] = await self.evaluate(config.train.steps)
            stop.raise_if_requested("during the final evaluation; training is complete and saved")
        final_model, adapter = self.trainer.final_model(), self.trainer.final_adapter()  # sharded: gathered
        teachers = {name: teacher.counters() for name, teacher in self.pool.teachers.items()}
        counters = distributed.summed({"teachers": teachers, "sampler": self.sampler.counters()})
        return distributed.from_main(self._finish(final_model, adapter, counters) if distributed.is_main() else None)

    def _finish(self, final_model: Any, adapter: Any, counters: dict[str, Any]) -> dict[str, Any]:
        """Save the final model and write the summary (the main process)."""
        final_uri = self.checkpoints.save_final(model=final_model, tokenizer=self.tokenizer, adapter=adapter)
        result = summary(self, final_uri, counters)
        (self.output_dir / "summary.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        self.sinks.write_summary(result)
        self.sinks.close()
        self.status.write("completed")
        log.info("done", summary=str(self.output_dir / "summary.json"), final_model=final_uri)
        return result

    async def cleanup(self) -> None:
        """Close what holds files, connections or threads, once each, however the run ended."""
        self.sinks.close()
        components = {id(c): c for c in (*(self.pool.teachers.values() if self.pool else ()), self.sampler)
                      if c is not None}
        for component in components.values():
            await component.aclose()
        if self.lock is not None:
            self.lock.close()  # releases the output folder


async def _run(recipe: Recipe) -> dict[str, Any]:
    try:
        recipe.setup()
        return await recipe.train()
    except RunInterrupted as stopped:
        if recipe.status is not None:
            recipe.status.write("stopped", signal=signal.Signals(stopped.signum).name)
        raise
    except KeyboardInterrupt:  # a second Ctrl-C
        if recipe.status is not None:
            recipe.status.write("stopped", signal="SIGINT")
        raise
    except Exception as exc:
        if recipe.status is not None:
            recipe.status.write("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        await recipe.cleanup()


def run(
    config: RunConfig,
    manager: PluginManager,
    *,
    resume: Resume = "auto",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run (or resume) a distillation; return the summary also written to ``summary.json``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    distributed.start()  # under torchrun; else nothing
    try:
        return asyncio.run(_run(Recipe(config, manager, resume=resume, progress=progress)))
    finally:
        distributed.stop()
