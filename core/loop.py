"""The recipe: strict on-policy distillation, one explicit loop.

Each step: take ``prompt_groups_per_step`` rows, sample ``completions_per_prompt`` completions per
row with the current weights, route each row to its teacher, score exactly the sampled tokens,
build the aligned batch, take one optimizer step, sync weights to the sampler, record metrics,
checkpoint and evaluate when due. Deterministic for a seed on CPU; resumable bit for bit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import structlog
import torch

from distill.align import build_token_batch
from distill.config import RunConfig, converter, display_config, resolve_path, route_value, teacher_key
from distill.data import DataCursor, Dataset, load_dataset
from distill.errors import CheckpointError, ConfigError, DistillError
from distill.evaluate import accuracy, evaluate, grade
from distill.manager import PluginManager
from distill.protocols import SkipRow
from distill.scoring import TeacherBook, TeacherPool
from distill.trainer import Trainer
from distill.types import BuildContext, PromptRow, Rollout, RunInfo, SamplingParams, TeacherScores

__all__ = ["run", "RunInterrupted", "Resume"]

log = structlog.get_logger("distill")

Resume = Literal["auto", "always", "never"]


class RunInterrupted(DistillError):
    """The run was asked to stop (SIGTERM / Ctrl-C) and saved a checkpoint first."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class _Clock:
    """Wall time per phase, accumulated across resumes."""

    def __init__(self, totals: dict[str, float] | None = None) -> None:
        self.totals: dict[str, float] = dict(totals or {})
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

    def raise_if_requested(self, when: str) -> None:
        if self.requested is not None:
            raise RunInterrupted(
                f"Stopped by {self.requested} {when}. Run the same command again to resume.", self.signum
            )

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


@attrs.define
class _Components:
    tokenizer: Any
    trainer: Trainer
    sampler: Any
    pool: TeacherPool
    checkpoints: Any
    sinks: list[Any]


def _load_student(config: RunConfig, path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_path = resolve_path(config.student.tokenizer, config) if config.student.tokenizer else path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, config.student.dtype))
    model.to(config.student.device)
    return model, tokenizer


def _vocabulary_problem(student_tokenizer: Any, name: str, theirs: Any, path: str) -> list[str]:
    """A teacher must share the student's vocabulary: logprobs are compared token by token."""
    if theirs is None:
        return []
    ours = student_tokenizer.get_vocab()
    if dict(theirs) == ours:
        return []
    differing = sorted(set(ours.items()) ^ set(dict(theirs).items()))[:5]
    return [
        f"teacher '{name}' does not share the student's vocabulary ({len(theirs)} vs {len(ours)} "
        f"tokens; first differences: {differing}); on-policy distillation compares logprobs token "
        f"by token, so both must use the same tokenizer @ {path}"
    ]


def _build(
    config: RunConfig, manager: PluginManager, output_dir: Path, model_path: str
) -> _Components:
    model, tokenizer = _load_student(config, model_path)
    context = BuildContext(
        run_config=config,
        output_dir=output_dir,
        seed=config.seed,
        device=config.student.device,
        tokenizer=tokenizer,
        student=model,
    )
    loss_spec = manager.get("loss", config.loss.name)
    objective = loss_spec.factory(config.loss.options, context)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    kernel = manager.select_loss_kernel(
        loss=loss_spec.name, kernel=config.loss.kernel, device=model.device.type, dtype=dtype
    )
    teachers: dict[str, Any] = {}
    shared: dict[str, Any] = {}  # teachers with the same backend and options share one instance
    problems: list[str] = []
    for index, teacher in enumerate(config.teachers):
        spec = manager.get("teacher", teacher.backend)
        identity = json.dumps([spec.name, converter.unstructure(teacher.options)], sort_keys=True, default=str)
        if identity not in shared:
            shared[identity] = spec.factory(teacher.options, context)
        name = teacher_key(teacher, index)
        teachers[name] = shared[identity]
        problems += _vocabulary_problem(tokenizer, name, teachers[name].vocabulary(), f"teachers[{index}]")
        if teacher.tokenizer:
            from transformers import AutoTokenizer

            declared = AutoTokenizer.from_pretrained(resolve_path(teacher.tokenizer, config)).get_vocab()
            problems += _vocabulary_problem(tokenizer, name, declared, f"teachers[{index}].tokenizer")
    if problems:
        raise ConfigError(problems, config.source)
    sampler = manager.get("sampler", config.sampler.backend).factory(config.sampler.options, context)
    router_spec = manager.get("router", config.router.name)
    blender = None
    if router_spec.multi_teacher:
        blender = manager.get("blender", config.blender.name).factory(config.blender.options, context)
    pool = TeacherPool(
        teachers=teachers,
        prompt_keys={teacher_key(t, i): t.teacher_messages_key for i, t in enumerate(config.teachers)},
        weights={teacher_key(t, i): t.blend_weight for i, t in enumerate(config.teachers)},
        router=router_spec.factory(config.router.options, context),
        blender=blender,
        top_k=objective.top_k,
    )
    checkpoints = manager.get("checkpoint_backend", config.checkpoint.backend).factory(
        config.checkpoint.options, context
    )
    sinks = [
        manager.get("metric_sink", name).factory(config.metrics.options[name], context)
        for name in config.metrics.sinks
    ]
    log.info("components", loss=loss_spec.name, kernel=kernel.name, router=router_spec.name, teachers=sorted(teachers))
    return _Components(tokenizer, Trainer(model, config, objective, kernel), sampler, pool, checkpoints, sinks)


def _rollout_metrics(rollouts: Sequence[Rollout], scores: Sequence[TeacherScores]) -> dict[str, float]:
    student = torch.cat([r.model_logprobs_C for r in rollouts])
    teacher = torch.cat([s.logprobs_C for s in scores])
    return {
        "reverse_kl": float((student - teacher).mean()),
        "teacher_logprob": float(teacher.mean()),
        "completion_tokens": int(student.numel()),
        "mean_completion_length": student.numel() / len(rollouts),
        "truncated_fraction": sum(not r.finished for r in rollouts) / len(rollouts),
    }


class _Run:
    """The state of one run and the steps of the recipe; :meth:`execute` reads top to bottom."""

    def __init__(self, config: RunConfig, manager: PluginManager, resume: Resume, progress: bool | None) -> None:
        self.config = config
        self.manager = manager
        self.resume = resume
        self.progress = progress
        self.started = time.perf_counter()
        self.output_dir = Path(config.output_dir)
        self.info = RunInfo(config=config, output_dir=self.output_dir)
        self.state: dict[str, Any] = {"step": 0, "tokens": 0, "skipped": {}, "eval": {}, "times": {}, "wall_time_s": 0.0}
        self.skipped: Counter[str] = Counter()
        self.clock = _Clock()
        self.wall_before = 0.0

    # -- setting up -----------------------------------------------------------------------------

    def _latest_checkpoint(self) -> Any:
        config = self.config
        backend = self.manager.get("checkpoint_backend", config.checkpoint.backend).factory(
            config.checkpoint.options,
            BuildContext(run_config=config, output_dir=self.output_dir, seed=config.seed, device=config.student.device),
        )
        checkpoint = backend.latest()
        if checkpoint is not None and self.resume == "never":
            raise CheckpointError(
                f"{self.output_dir} already holds checkpoints (latest: step {checkpoint.step}). Resume "
                f"it, or choose another output_dir (--set output_dir=...) to start afresh."
            )
        if checkpoint is None and self.resume == "always":
            raise CheckpointError(f"Nothing to resume: no complete checkpoint under {self.output_dir}.")
        return checkpoint

    def _load_data(self) -> None:
        config, tokenizer = self.config, self.parts.tokenizer
        limit = config.data.max_prompt_tokens
        max_context = getattr(self.parts.trainer.model.config, "max_position_embeddings", None)
        if max_context:
            room = max_context - max(config.sampling.max_new_tokens, config.eval.max_new_tokens or 0)
            limit = room if limit is None else min(limit, room)
        views = sorted({t.teacher_messages_key for t in config.teachers})
        self.train_data = load_dataset(resolve_path(config.data.train, config), tokenizer,
                                       max_prompt_tokens=limit, teacher_messages_keys=views)
        self.eval_data: Dataset | None = None
        if config.data.eval:
            self.eval_data = load_dataset(resolve_path(config.data.eval, config), tokenizer,
                                          max_prompt_tokens=limit, teacher_messages_keys=views)
        self.eval_rows = self.eval_data.rows[: config.eval.limit] if self.eval_data else ()
        for dataset in filter(None, (self.train_data, self.eval_data)):
            if dataset.skipped:
                log.warning("skipped dataset rows", path=dataset.path, by_reason=dataset.skipped,
                            first_line=dataset.first_skipped_line)

    def prepare(self) -> None:
        config = self.config
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = self._latest_checkpoint()
        model_path = checkpoint.model_dir if checkpoint else resolve_path(config.student.model, config)
        self.parts = _build(config, self.manager, self.output_dir, model_path)
        (self.output_dir / "config.json").write_text(json.dumps(display_config(config), indent=1), encoding="utf-8")
        self._load_data()
        self.cursor = DataCursor(len(self.train_data.rows), seed=config.seed, shuffle=config.data.shuffle)
        if checkpoint is not None:
            self.parts.trainer.load_state_dict(checkpoint.trainer_state)
            self.state = checkpoint.loop_state
            self.cursor.load_state_dict(self.state["cursor"])
            log.info("resumed", step=checkpoint.step, checkpoint=checkpoint.uri)
        self.skipped = Counter(self.state["skipped"])
        self.clock = _Clock(self.state["times"])
        self.wall_before = self.state["wall_time_s"]
        self.parts.pool.totals = {n: TeacherBook(**b) for n, b in self.state.get("teachers", {}).items()}
        for sink in self.parts.sinks:
            sink.resume_at(self.state["step"])

    # -- the recipe -----------------------------------------------------------------------------

    def route_of(self, row: PromptRow) -> str | None:
        """The row's route value (its ``route_key`` field), for per-route reports."""
        value = row.metadata.get(getattr(self.parts.pool.router, "route_key", "teacher"))
        return value if isinstance(value, str) else None

    async def _score_for_eval(self, rollouts: Sequence[Rollout]) -> tuple[list[Rollout], list[TeacherScores]]:
        kept, targets, _ = await self.parts.pool.score(rollouts, record=False)
        return kept, targets

    async def evaluate(self, step: int) -> dict[str, Any]:
        with self.clock.phase("eval"):
            result = await evaluate(self.parts.sampler, self._score_for_eval, self.eval_rows,
                                    self.parts.tokenizer, self.config, self.route_of)
        log.info("eval", step=step, accuracy=result["accuracy"], reverse_kl=result["reverse_kl"],
                 per_route=result.get("per_route"))
        self.state["eval"].setdefault("history", []).append({"step": step, **result})
        return result

    async def evaluate_teachers(self) -> None:
        """Each teacher's accuracy on the eval rows routed to it, seeing its own prompt."""
        pool, evaluation = self.parts.pool, self.state["eval"]
        by_teacher: dict[str, list[PromptRow]] = {}
        for row in self.eval_rows:
            try:
                names = pool.router.route(row)
            except SkipRow:
                continue
            if len(names) == 1:
                by_teacher.setdefault(names[0], []).append(row)
        results: dict[str, float | None] = {}
        for name, rows in by_teacher.items():
            teacher = pool.teachers[name]
            if hasattr(teacher, "complete"):
                graded = await grade(teacher, rows, self.parts.tokenizer, self.config,
                                     teacher_prompt_key=pool.prompt_keys[name])
                results[name] = accuracy(graded)
        if len(pool.teachers) == 1:
            evaluation["teacher_accuracy"] = next(iter(results.values()), None)
        evaluation["teacher_accuracy_by_teacher"] = results

    async def evaluate_before(self) -> None:
        """Teacher and student accuracy before training (once per run, kept across resumes)."""
        if not self.eval_rows or "before" in self.state["eval"] or not self.config.eval.at_start:
            return
        with self.clock.phase("eval"):
            await self.evaluate_teachers()
        self.state["eval"]["before"] = await self.evaluate(0)

    async def train_step(self, step: int, params: SamplingParams) -> dict[str, Any] | None:
        """Sample, score, train on one step's rows; None when no row could be scored."""
        config, parts, clock = self.config, self.parts, self.clock
        rows = [self.train_data.rows[i] for i in self.cursor.take(config.train.prompt_groups_per_step)]
        with clock.phase("sampling"):
            rollouts = await parts.sampler.sample(rows, params, seed=_step_seed(config.seed, step))
        with clock.phase("teacher_scoring"):
            rollouts, scores, books = await parts.pool.score(rollouts, self.skipped)
        if not rollouts:
            log.warning("no row of this step could be scored", step=step, skipped=dict(self.skipped))
            return None
        batch = build_token_batch(rollouts, scores, pad_id=parts.tokenizer.pad_token_id or 0)
        with clock.phase("training"):
            train_metrics = parts.trainer.train_step(batch)
        with clock.phase("weight_sync"):
            await parts.sampler.sync_weights(step)
        self.state["tokens"] += batch.num_tokens
        busy = sum(clock.last[p] for p in ("sampling", "teacher_scoring", "training"))
        return {
            **train_metrics,
            **_rollout_metrics(rollouts, scores),
            "route_skips_total": sum(self.skipped.values()),
            **{f"teacher/{name}/{key}": value for name, book in books.items()
               for key, value in book.as_dict().items()},
            "time_sampling_s": clock.last["sampling"],
            "time_teacher_scoring_s": clock.last["teacher_scoring"],
            "time_training_s": clock.last["training"],
            "time_weight_sync_s": clock.last["weight_sync"],
            "tokens_per_s": batch.num_tokens / busy if busy else 0.0,
        }

    def record(self, step: int, metrics: dict[str, Any]) -> None:
        for sink in self.parts.sinks:
            sink.write(step, metrics)
        self.manager.on_step_end(run=self.info, step=step, metrics=metrics)

    def save(self, step: int) -> None:
        self.state.update(step=step, cursor=self.cursor.state_dict(), skipped=dict(self.skipped),
                          times=self.clock.totals, wall_time_s=self.wall_time(),
                          teachers={n: attrs.asdict(b) for n, b in self.parts.pool.totals.items()})
        with self.clock.phase("checkpoint"):
            uri = self.parts.checkpoints.save(
                step, model=self.parts.trainer.model, tokenizer=self.parts.tokenizer,
                trainer_state=self.parts.trainer.state_dict(), loop_state=self.state,
            )
        self.manager.on_checkpoint_saved(run=self.info, step=step, uri=uri)
        log.info("checkpoint", step=step, uri=uri)

    def wall_time(self) -> float:
        """Wall time of this run, including earlier attempts it resumed from."""
        return self.wall_before + time.perf_counter() - self.started

    async def execute(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        config = self.config
        self.prepare()
        self.started_from = self.state["step"]
        params = SamplingParams(
            max_new_tokens=config.sampling.max_new_tokens,
            temperature=config.sampling.temperature,
            top_k=config.sampling.top_k,
            top_p=config.sampling.top_p,
            n=config.train.completions_per_prompt,
        )
        every_eval, every_save = config.eval.every_steps, config.checkpoint.every_steps
        with _StopFlag() as stop:
            with self.clock.phase("weight_sync"):
                await self.parts.sampler.sync_weights(self.started_from)  # a remote server may hold others
            await self.evaluate_before()
            stop.raise_if_requested("before training started")
            bar = tqdm(total=config.train.steps, initial=self.started_from, unit="step",
                       disable=True if self.progress is False else None, dynamic_ncols=True)
            try:
                for step in range(self.started_from + 1, config.train.steps + 1):
                    metrics = await self.train_step(step, params)
                    if metrics is not None:
                        self.record(step, metrics)
                        _show(bar, step, metrics)
                    bar.update(1)
                    if self.eval_rows and every_eval and step % every_eval == 0 and step < config.train.steps:
                        await self.evaluate(step)
                    if stop.requested or step == config.train.steps or (every_save and step % every_save == 0):
                        self.save(step)
                    stop.raise_if_requested(f"after step {step}; the checkpoint is saved")
            finally:
                bar.close()
                for sink in self.parts.sinks:
                    sink.close()
            if self.eval_rows:
                self.state["eval"]["after"] = await self.evaluate(config.train.steps)
            stop.raise_if_requested("during the final evaluation; training is complete and saved")
        final_uri = self.parts.checkpoints.save_final(model=self.parts.trainer.model, tokenizer=self.parts.tokenizer)
        summary = self.summary(final_uri)
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        log.info("done", summary=str(self.output_dir / "summary.json"), final_model=final_uri)
        return summary

    def per_route(self) -> dict[str, dict[str, Any]]:
        """Held-out results per route value; with one teacher per route, that teacher's numbers too."""
        evaluation, config = self.state["eval"], self.config
        before = evaluation.get("before", {}).get("per_route", {})
        after = evaluation.get("after", {}).get("per_route", {})
        one_per_route = not self.manager.get("router", config.router.name).multi_teacher
        teacher_of = {route_value(t, i): teacher_key(t, i) for i, t in enumerate(config.teachers)}
        report = {}
        for route in sorted(set(before) | set(after)):
            entry = {
                "eval_rows": (after.get(route) or before.get(route))["rows"],
                "accuracy_before": before.get(route, {}).get("accuracy"),
                "accuracy_after": after.get(route, {}).get("accuracy"),
                "reverse_kl_before": before.get(route, {}).get("reverse_kl"),
                "reverse_kl_after": after.get(route, {}).get("reverse_kl"),
            }
            teacher = teacher_of.get(route)
            if one_per_route and teacher is not None:
                book = self.parts.pool.totals.get(teacher, TeacherBook())
                entry.update(
                    teacher=teacher,
                    teacher_accuracy=evaluation.get("teacher_accuracy_by_teacher", {}).get(teacher),
                    rows_scored=book.rows,
                    tokens_scored=book.tokens,
                )
            report[route] = entry
        return report

    async def run_and_close(self) -> dict[str, Any]:
        """Execute, then close what holds connections (components with an ``aclose``), however it ended."""
        try:
            return await self.execute()
        finally:
            parts = getattr(self, "parts", None)
            components = {id(t): t for t in parts.pool.teachers.values()} if parts else {}
            if parts:
                components[id(parts.sampler)] = parts.sampler
            for component in components.values():
                if hasattr(component, "aclose"):
                    await component.aclose()

    def summary(self, final_uri: str) -> dict[str, Any]:
        config, evaluation = self.config, self.state["eval"]
        before, after = evaluation.get("before", {}), evaluation.get("after", {})
        return {
            "steps": config.train.steps,
            "resumed_from_step": self.started_from or None,
            "tokens": self.state["tokens"],
            "wall_time_s": self.wall_time(),
            "time_s": {k: self.clock.totals.get(k, 0.0)
                       for k in ("sampling", "teacher_scoring", "training", "weight_sync", "eval", "checkpoint")},
            "rows_train": len(self.train_data.rows),
            "rows_skipped": dict(Counter(self.train_data.skipped) + self.skipped),
            "eval_rows": len(self.eval_rows),
            "eval_rows_skipped": dict(self.eval_data.skipped) if self.eval_data else {},
            "teacher_accuracy": evaluation.get("teacher_accuracy"),
            "student_accuracy_before": before.get("accuracy"),
            "student_accuracy_after": after.get("accuracy"),
            "reverse_kl_before": before.get("reverse_kl"),
            "reverse_kl_after": after.get("reverse_kl"),
            "teachers": {
                name: {**book.as_dict(), **getattr(self.parts.pool.teachers[name], "counters", dict)()}
                for name, book in sorted(self.parts.pool.totals.items())
            },
            "sampler": getattr(self.parts.sampler, "counters", dict)(),
            "per_route": self.per_route(),
            "eval_history": evaluation.get("history", []),
            "loss": config.loss.name,
            "loss_kernel": self.parts.trainer.kernel.name,
            "final_model": final_uri,
        }


def _per_teacher_kl(metrics: dict[str, Any]) -> dict[str, str]:
    return {
        f"rkl[{key.split('/')[1]}]": f"{value:.3f}"
        for key, value in metrics.items()
        if key.startswith("teacher/") and key.endswith("/reverse_kl") and value is not None
    }


def _show(bar: Any, step: int, metrics: dict[str, Any]) -> None:
    """Progress on a terminal; one log line per step otherwise (the bar is disabled there)."""
    if bar.disable:
        log.info("step", step=step, loss=metrics["loss"], reverse_kl=metrics["reverse_kl"],
                 grad_norm=metrics["grad_norm"], tokens_per_s=metrics["tokens_per_s"])
    else:
        per_teacher = _per_teacher_kl(metrics) if sum(k.endswith("/reverse_kl") for k in metrics) > 1 else {}
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", rkl=f"{metrics['reverse_kl']:.4f}", **per_teacher,
                        tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)


def run(
    config: RunConfig,
    manager: PluginManager,
    *,
    resume: Resume = "auto",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run (or resume) a distillation; return the summary also written to ``summary.json``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return asyncio.run(_Run(config, manager, resume, progress).run_and_close())
