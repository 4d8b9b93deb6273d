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
from distill.config import RunConfig, display_config, resolve_path, teacher_key
from distill.data import DataCursor, Dataset, load_dataset
from distill.errors import CheckpointError, DistillError, TokenizerMismatchError
from distill.evaluate import accuracy, evaluate
from distill.manager import PluginManager
from distill.protocols import SkipRow
from distill.trainer import Trainer
from distill.types import BuildContext, Rollout, RunInfo, SamplingParams, ScoreRequest, TeacherScores

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
    teachers: dict[str, Any]
    router: Any
    checkpoints: Any
    sinks: list[Any]


def _load_student(config: RunConfig, path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_path = resolve_path(config.student.tokenizer, config) if config.student.tokenizer else path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, config.student.dtype))
    model.to(config.student.device)
    return model, tokenizer


def _check_vocabulary(student_tokenizer: Any, name: str, teacher: Any) -> None:
    theirs = teacher.vocabulary()
    if theirs is None:
        return
    ours = student_tokenizer.get_vocab()
    if dict(theirs) != ours:
        differing = sorted(set(ours.items()) ^ set(dict(theirs).items()))[:5]
        raise TokenizerMismatchError(
            f"Teacher '{name}' does not share the student's vocabulary ({len(theirs)} vs "
            f"{len(ours)} tokens; first differences: {differing}). On-policy distillation compares "
            f"logprobs token by token, so both must use the same tokenizer."
        )


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
    shared: dict[tuple[str, Any], Any] = {}  # teachers naming the same model share one instance
    for index, teacher in enumerate(config.teachers):
        spec = manager.get("teacher", teacher.backend)
        identity = (spec.name, teacher.options)
        if identity not in shared:
            shared[identity] = spec.factory(teacher.options, context)
        name = teacher_key(teacher, index)
        _check_vocabulary(tokenizer, name, shared[identity])
        teachers[name] = shared[identity]
    sampler = manager.get("sampler", config.sampler.backend).factory(config.sampler.options, context)
    router = manager.get("router", config.router.name).factory(config.router.options, context)
    checkpoints = manager.get("checkpoint_backend", config.checkpoint.backend).factory(
        config.checkpoint.options, context
    )
    sinks = [
        manager.get("metric_sink", name).factory(config.metrics.options[name], context)
        for name in config.metrics.sinks
    ]
    log.info("components", loss=loss_spec.name, kernel=kernel.name, teachers=sorted(teachers))
    return _Components(tokenizer, Trainer(model, config, objective, kernel), sampler, teachers, router, checkpoints, sinks)


async def _route_and_score(
    rollouts: Sequence[Rollout], parts: _Components, top_k: int, skipped: Counter[str]
) -> tuple[list[Rollout], list[TeacherScores]]:
    """Send each rollout to its row's teacher; teachers score concurrently. Skipped rows are counted."""
    by_teacher: dict[str, list[int]] = {}
    skipped_rows: set[int] = set()
    for i, rollout in enumerate(rollouts):
        try:
            names = parts.router.route(rollout.row)
        except SkipRow as skip:
            if rollout.row.index not in skipped_rows:
                skipped_rows.add(rollout.row.index)
                skipped[skip.reason] += 1
            continue
        if len(names) != 1:
            raise DistillError(
                f"router '{type(parts.router).__name__}' sent a row to {len(names)} teachers; "
                f"scoring one row with several teachers needs a blending loss."
            )
        by_teacher.setdefault(names[0], []).append(i)

    async def score(name: str, indices: list[int]) -> list[TeacherScores]:
        requests = [
            ScoreRequest(
                prompt_ids=rollouts[i].row.teacher_prompt_ids,
                completion_ids=tuple(rollouts[i].completion_ids_C.tolist()),
            )
            for i in indices
        ]
        return await parts.teachers[name].score(requests, top_k=top_k)

    results = await asyncio.gather(*(score(name, idx) for name, idx in by_teacher.items()))
    scored: dict[int, TeacherScores] = {}
    for indices, scores in zip(by_teacher.values(), results, strict=True):
        scored.update(zip(indices, scores, strict=True))
    order = sorted(scored)
    return [rollouts[i] for i in order], [scored[i] for i in order]


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


async def _run(config: RunConfig, manager: PluginManager, resume: Resume, progress: bool | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.seed)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_info = RunInfo(config=config, output_dir=output_dir)

    # Where to start: the newest complete checkpoint, unless told otherwise.
    probe = manager.get("checkpoint_backend", config.checkpoint.backend).factory(
        config.checkpoint.options,
        BuildContext(run_config=config, output_dir=output_dir, seed=config.seed, device=config.student.device),
    )
    checkpoint = probe.latest()
    if checkpoint is not None and resume == "never":
        raise CheckpointError(
            f"{output_dir} already holds checkpoints (latest: step {checkpoint.step}). Resume it, "
            f"or choose another output_dir (--set output_dir=...) to start afresh."
        )
    if checkpoint is None and resume == "always":
        raise CheckpointError(f"Nothing to resume: no complete checkpoint under {output_dir}.")
    model_path = checkpoint.model_dir if checkpoint else resolve_path(config.student.model, config)
    parts = _build(config, manager, output_dir, model_path)
    (output_dir / "config.json").write_text(json.dumps(display_config(config), indent=1), encoding="utf-8")

    max_context = getattr(parts.trainer.model.config, "max_position_embeddings", None)
    limit = config.data.max_prompt_tokens
    if max_context:
        room = max_context - config.sampling.max_new_tokens
        limit = room if limit is None else min(limit, room)
    train_data = load_dataset(resolve_path(config.data.train, config), parts.tokenizer, max_prompt_tokens=limit)
    eval_data: Dataset | None = None
    if config.data.eval:
        eval_data = load_dataset(resolve_path(config.data.eval, config), parts.tokenizer, max_prompt_tokens=limit)
    eval_rows = eval_data.rows[: config.eval.limit] if eval_data else ()
    for dataset in filter(None, (train_data, eval_data)):
        if dataset.skipped:
            log.warning("skipped dataset rows", path=dataset.path, by_reason=dataset.skipped,
                        first_line=dataset.first_skipped_line)

    cursor = DataCursor(len(train_data.rows), seed=config.seed, shuffle=config.data.shuffle)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "skipped": {}, "eval": {}, "times": {}}
    if checkpoint is not None:
        parts.trainer.load_state_dict(checkpoint.trainer_state)
        state = checkpoint.loop_state
        cursor.load_state_dict(state["cursor"])
        log.info("resumed", step=checkpoint.step, checkpoint=checkpoint.uri)
    start_step = state["step"]
    skipped: Counter[str] = Counter(state["skipped"])
    clock = _Clock(state["times"])
    for sink in parts.sinks:
        sink.resume_at(start_step)

    async def score(rollouts: Sequence[Rollout]) -> tuple[list[Rollout], list[TeacherScores]]:
        return await _route_and_score(rollouts, parts, parts.trainer.objective.top_k, Counter())

    async def run_eval(step: int) -> dict[str, Any]:
        with clock.phase("eval"):
            result = await evaluate(parts.sampler, score, eval_rows, parts.tokenizer, config)
        log.info("eval", step=step, **result)
        state["eval"].setdefault("history", []).append({"step": step, **result})
        return result

    if eval_rows and "before" not in state["eval"] and config.eval.at_start:
        teacher = next(iter(parts.teachers.values()))
        if hasattr(teacher, "complete") and len(parts.teachers) == 1:
            with clock.phase("eval"):
                state["eval"]["teacher_accuracy"] = await accuracy(teacher, eval_rows, parts.tokenizer, config)
        state["eval"]["before"] = await run_eval(0)

    params = SamplingParams(
        max_new_tokens=config.sampling.max_new_tokens,
        temperature=config.sampling.temperature,
        top_k=config.sampling.top_k,
        top_p=config.sampling.top_p,
        n=config.train.completions_per_prompt,
    )
    bar = tqdm(total=config.train.steps, initial=start_step, unit="step",
               disable=True if progress is False else None, dynamic_ncols=True)
    log_steps = bar.disable
    started = time.perf_counter()
    wall_before = state.get("wall_time_s", 0.0)
    step = start_step

    def save(step: int) -> None:
        state.update(step=step, cursor=cursor.state_dict(), skipped=dict(skipped), times=clock.totals,
                     wall_time_s=wall_before + time.perf_counter() - started)
        with clock.phase("checkpoint"):
            uri = parts.checkpoints.save(step, model=parts.trainer.model, tokenizer=parts.tokenizer,
                                         trainer_state=parts.trainer.state_dict(), loop_state=state)
        manager.on_checkpoint_saved(run=run_info, step=step, uri=uri)
        log.info("checkpoint", step=step, uri=uri)

    with _StopFlag() as stop:
        try:
            for step in range(start_step + 1, config.train.steps + 1):
                rows = [train_data.rows[i] for i in cursor.take(config.train.prompt_groups_per_step)]
                with clock.phase("sampling"):
                    rollouts = await parts.sampler.sample(rows, params, seed=_step_seed(config.seed, step))
                with clock.phase("teacher_scoring"):
                    rollouts, scores = await _route_and_score(
                        rollouts, parts, parts.trainer.objective.top_k, skipped
                    )
                if not rollouts:
                    log.warning("no row of this step could be scored", step=step)
                    continue
                batch = build_token_batch(rollouts, scores, pad_id=parts.tokenizer.pad_token_id or 0)
                with clock.phase("training"):
                    train_metrics = parts.trainer.train_step(batch)
                parts.sampler.sync_weights(step)
                state["tokens"] += batch.num_tokens
                step_time = sum(clock.last.get(p, 0.0) for p in ("sampling", "teacher_scoring", "training"))
                metrics = {
                    **train_metrics,
                    **_rollout_metrics(rollouts, scores),
                    "rows_skipped_total": sum(skipped.values()),
                    "time_sampling_s": clock.last["sampling"],
                    "time_teacher_scoring_s": clock.last["teacher_scoring"],
                    "time_training_s": clock.last["training"],
                    "tokens_per_s": batch.num_tokens / step_time if step_time else 0.0,
                }
                for sink in parts.sinks:
                    sink.write(step, metrics)
                manager.on_step_end(run=run_info, step=step, metrics=metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", rkl=f"{metrics['reverse_kl']:.4f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                if log_steps:
                    log.info("step", step=step, loss=metrics["loss"], reverse_kl=metrics["reverse_kl"],
                             grad_norm=metrics["grad_norm"], tokens_per_s=metrics["tokens_per_s"])
                if eval_rows and config.eval.every_steps and step % config.eval.every_steps == 0 and step < config.train.steps:
                    await run_eval(step)
                every = config.checkpoint.every_steps
                if stop.requested or step == config.train.steps or (every and step % every == 0):
                    save(step)
                if stop.requested:
                    raise RunInterrupted(
                        f"Stopped by {stop.requested} after step {step}; the checkpoint is saved. "
                        f"Run the same command again to resume.",
                        stop.signum,
                    )
        finally:
            bar.close()
            for sink in parts.sinks:
                sink.close()

    if eval_rows:
        state["eval"]["after"] = await run_eval(config.train.steps)
    final_uri = parts.checkpoints.save_final(model=parts.trainer.model, tokenizer=parts.tokenizer)
    summary = _summary(config, state, skipped, train_data, eval_data, clock,
                       wall_before + time.perf_counter() - started, final_uri, parts)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    log.info("done", summary=str(output_dir / "summary.json"), final_model=final_uri)
    return summary


def _summary(
    config: RunConfig,
    state: dict[str, Any],
    skipped: Counter[str],
    train_data: Dataset,
    eval_data: Dataset | None,
    clock: _Clock,
    wall_time: float,
    final_uri: str,
    parts: _Components,
) -> dict[str, Any]:
    evaluation = state["eval"]
    before, after = evaluation.get("before", {}), evaluation.get("after", {})
    rows_skipped = Counter(train_data.skipped) + skipped
    return {
        "steps": config.train.steps,
        "tokens": state["tokens"],
        "wall_time_s": wall_time,
        "time_s": {k: clock.totals.get(k, 0.0) for k in ("sampling", "teacher_scoring", "training", "eval", "checkpoint")},
        "rows_train": len(train_data.rows),
        "rows_skipped": dict(rows_skipped),
        "eval_rows_skipped": dict(eval_data.skipped) if eval_data else {},
        "teacher_accuracy": evaluation.get("teacher_accuracy"),
        "student_accuracy_before": before.get("accuracy"),
        "student_accuracy_after": after.get("accuracy"),
        "reverse_kl_before": before.get("reverse_kl"),
        "reverse_kl_after": after.get("reverse_kl"),
        "eval_history": evaluation.get("history", []),
        "loss": config.loss.name,
        "loss_kernel": parts.trainer.kernel.name,
        "final_model": final_uri,
    }


def run(
    config: RunConfig,
    manager: PluginManager,
    *,
    resume: Resume = "auto",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run (or resume) a distillation; return the summary also written to ``summary.json``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return asyncio.run(_run(config, manager, resume, progress))
