"""The interfaces of the objects that component factories build.

Hooks describe components (``distill.types``); factories build objects satisfying these protocols;
the loop only talks to these. Network and model I/O are ``async`` so remote backends can overlap.
Optional capabilities are defaults here (a no-op ``aclose``, empty ``counters`` and
``state_dict``, ``supports_complete = False``): subclass the protocol to get them, and the loop
calls them without probing. A factory's object is checked when it is built (:func:`missing_members`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    import torch

    from distill.align import TokenBatch
    from distill.types import (
        PromptRow,
        Rollout,
        SamplingParams,
        ScoreFailure,
        ScoreRequest,
        TeacherScores,
        WeightedScores,
    )

__all__ = [
    "Component",
    "missing_members",
    "Sampler",
    "TeacherScorer",
    "Router",
    "SkipRow",
    "Blender",
    "Objective",
    "LossKernel",
    "Trainer",
    "CheckpointBackend",
    "Checkpoint",
    "MetricSink",
]


class Component(Protocol):
    """Defaults every built component shares: nothing to close, nothing to count, nothing to resume."""

    async def aclose(self) -> None:
        """Release connections and threads; awaited once when the run ends, however it ended."""

    def counters(self) -> dict[str, Any]:
        """Counters reported in ``summary.json`` (failed attempts, retries, ...). Under torchrun each
        process counts its own and the summary adds them up (numbers add, mappings merge key by key)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved in every checkpoint, so counters cover the whole run, not the
        attempt since the last resume."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned, when the run resumes from a checkpoint."""


def missing_members(obj: object, protocol: type) -> list[str]:
    """The members of ``protocol`` (its methods and capability flags) that ``obj`` lacks."""
    names = [
        name for klass in protocol.__mro__ if klass not in (object, Protocol) and Protocol in klass.__mro__
        for name in vars(klass) if not name.startswith("_")
    ]
    return sorted({name for name in names if not hasattr(obj, name)})


@runtime_checkable
class Sampler(Component, Protocol):
    """Samples the student's rollouts."""

    async def sample(
        self, rows: Sequence[PromptRow], params: SamplingParams, *, seeds: Sequence[int]
    ) -> list[Rollout]:
        """``params.n`` completions per row, grouped by row, row ``i``'s drawn from ``seeds[i]``.

        A row with the same seed and weights gets the same completions whatever else the call
        holds: a resumed run repeats its steps, and processes sharing a step sample what one would."""

    async def complete(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int) -> list[list[int]]:
        """Greedy completion ids (without prompt), one list per prompt; used by evaluation."""

    async def sync_weights(self, step: int) -> None:
        """Make the next ``sample`` use the trainer's current weights (a no-op when they are shared).

        Called once before the first sample of a run (fresh or resumed) and after every step."""


@runtime_checkable
class TeacherScorer(Component, Protocol):
    """Scores exactly the tokens the student sampled.

    ``supports_complete``: the teacher can also generate (``complete``), so a run reports its own
    accuracy on the held-out rows.
    """

    supports_complete: ClassVar[bool] = False

    async def score(
        self, requests: Sequence[ScoreRequest], *, top_k: int
    ) -> list[TeacherScores | ScoreFailure]:
        """Per completion token: the teacher's logprob, and its top-``top_k`` when ``top_k`` > 0.

        A teacher whose spec declares the ``hidden`` signal is also called with ``hidden=True`` for
        full-vocabulary losses: it then fills ``hidden_C_G`` and ``head_V_G`` too.
        A request that failed for good gets a :class:`ScoreFailure`: its rollout is dropped and
        counted. Raise to stop the run (a teacher that stays down).
        """

    async def complete(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int) -> list[list[int]]:
        """Greedy completion ids, when ``supports_complete``."""
        raise NotImplementedError(f"{type(self).__name__} does not generate")


class SkipRow(Exception):
    """Raised by a router for a row no teacher should score; ``reason`` is counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@runtime_checkable
class Router(Protocol):
    """Chooses the teacher(s) that score a row; ``route_key`` is the row field routes are read from
    (per-route results use it)."""

    route_key: ClassVar[str] = "teacher"

    def route(self, row: PromptRow) -> tuple[str, ...]:
        """Names of the teachers that score ``row``; raise :class:`SkipRow` to skip it."""


@runtime_checkable
class Blender(Protocol):
    """Merges the top-K targets of several teachers for one completion into one."""

    def blend(self, teachers: Sequence[WeightedScores], *, top_k: int, where: str = "") -> TeacherScores:
        """One target with exactly ``top_k`` candidates per position; ``where`` names the row in errors."""


@runtime_checkable
class Objective(Protocol):
    """A loss on the student's final hidden states ``hidden_N_H`` and head ``weight_V_H``.

    It returns the loss *summed* over tokens and per-token-summed metrics; the trainer normalises
    over the whole step. The default :meth:`loss` asks the kernel for the student's logprobs at
    :meth:`target_ids` (so fused kernels never build [N, V] logits) and hands them to
    :meth:`__call__`: an objective on a few ids per token implements those two. A full-vocabulary
    objective overrides :meth:`loss` and uses ``kernel.divergence``.
    """

    def loss(
        self, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, kernel: LossKernel, tokens: TokenBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss, per-token-summed metric tensors to be averaged by the trainer)."""
        ids_N_K = self.target_ids(tokens).to(hidden_N_H.device)
        return self(kernel(hidden_N_H, weight_V_H, ids_N_K), tokens)

    def target_ids(self, tokens: TokenBatch) -> torch.Tensor:
        """[N, K] vocabulary ids whose student logprobs the loss needs."""
        raise NotImplementedError(f"{type(self).__name__} overrides neither loss nor target_ids")

    def __call__(
        self, logprobs_N_K: torch.Tensor, tokens: TokenBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss, metrics) from the student's logprobs at :meth:`target_ids`."""
        raise NotImplementedError(f"{type(self).__name__} overrides neither loss nor __call__")


class LossKernel(Protocol):
    """``logprobs_N_K = log_softmax(hidden_N_H @ weight_V_H.T)[n, ids_N_K[n, k]]``, differentiable;
    ``divergence`` gives the per-token full-vocabulary divergence from a teacher (TRL's generalised
    JSD: ``beta = 0`` forward KL, ``beta = 1`` reverse KL, temperature on both), gradients to the
    student only."""

    name: str

    def __call__(
        self, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, ids_N_K: torch.Tensor
    ) -> torch.Tensor: ...

    def divergence(
        self,
        hidden_N_H: torch.Tensor,
        weight_V_H: torch.Tensor,
        teacher_hidden_N_G: torch.Tensor,
        teacher_weight_V_G: torch.Tensor,
        *,
        beta: float,
        temperature: float,
    ) -> torch.Tensor: ...


@runtime_checkable
class Trainer(Protocol):
    """Owns the student and its optimizer; the loop hands it one step's batch at a time.

    ``model`` is the Hugging Face module the student lives in: a local sampler shares it, a remote
    sampler's ``sync_weights`` reads it, checkpoints save it. It may be a PEFT model (LoRA): a
    remote sampler then serves it merged, as :meth:`final_model` exports it, merging copies of one
    layer at a time so ``model`` never changes (or, with vLLM, loads the adapter alone). A remote
    trainer (a service with ``forward_backward`` and ``optim_step``, as Tinker and the Fireworks
    training API have) sends the batch and the loss in ``train_step``, keeps ``model`` a local copy
    it refreshes after each step (or one a remote sampler never reads), and keeps the service's
    session in ``state_dict``.
    """

    model: Any

    def train_step(self, batch: TokenBatch | None) -> dict[str, float]:
        """One optimizer step on the whole batch; the step's metrics (``loss`` and the objective's,
        averaged per token, ``grad_norm``, ``learning_rate``). ``batch`` is None only in a run sharded
        over processes, when none of this process's rows could be scored: it still takes its part in
        the step's collectives, adding nothing."""

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs besides ``model``'s weights (optimizer, schedule, RNG)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back :meth:`state_dict`'s state, after the factory loaded the checkpoint's weights."""

    def checkpoint_model(self) -> Any | None:
        """The module a checkpoint saves (``save_pretrained``): ``model``, or None when the trainer
        shards it over processes and keeps the weights in its state's :data:`SHARDED` part."""
        return self.model

    def final_model(self) -> Any:
        """The module the run exports as its final student, loadable with plain ``from_pretrained``
        (every process calls this; only the main process's result is saved)."""
        return self.model

    def final_adapter(self) -> Any | None:
        """The PEFT model whose adapter :meth:`final_model` merged, exported beside it; None without one."""
        return None


SHARDED = "sharded"
"""The key of a trainer state's sharded part: state dicts of DTensors that every process holds a
share of (model and optimizer under FSDP2). A checkpoint backend writes it from every process with
``torch.distributed.checkpoint``, so it is never gathered whole, and gives it back as a function
that loads it into state dicts of the same structure, resharded for however many processes read it."""


@attrs.frozen(kw_only=True)
class Checkpoint:
    """A complete, resumable checkpoint: ``model_dir`` holds Hugging Face weights, or is None when
    the weights are in the trainer state's :data:`SHARDED` part (a run sharded over processes)."""

    step: int
    uri: str
    model_dir: str | None
    trainer_state: dict[str, Any]
    loop_state: dict[str, Any]


@runtime_checkable
class CheckpointBackend(Protocol):
    """Atomic, resumable storage of training state."""

    def save(
        self,
        step: int,
        *,
        model: Any,
        tokenizer: Any,
        trainer_state: dict[str, Any],
        loop_state: dict[str, Any],
    ) -> str:
        """Store a complete checkpoint or nothing; return its URI. Every process calls it (under
        torchrun): each writes its share of ``trainer_state``'s :data:`SHARDED` part, the main
        process the rest (``model`` is then None on every process) and commits it."""

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""

    def save_final(self, *, model: Any, tokenizer: Any, adapter: Any | None = None) -> str:
        """Store the final student where plain ``from_pretrained`` loads it, and ``adapter`` (a PEFT
        model, when the trainer trained one) under ``adapter/`` for ``PeftModel.from_pretrained``;
        return its URI. The main process alone calls it."""


@runtime_checkable
class MetricSink(Protocol):
    """Receives one flat mapping of metrics per step; held-out results and the summary too, for
    sinks that record them (the defaults ignore them).

    A call that raises is counted in the summary and logged once; the run goes on.
    """

    def write(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def resume_at(self, step: int) -> None:
        """Forget anything recorded after ``step`` (the run resumes from there)."""

    def write_eval(self, step: int, result: Mapping[str, Any]) -> None:
        """Held-out results at ``step`` (0: before training): ``accuracy`` and ``reverse_kl``
        (None when nothing could be graded or scored) and, when rows have routes, ``per_route``
        (route value -> ``accuracy``, ``reverse_kl``, ``rows``)."""

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """The run's summary (as in ``summary.json``), once, when training and the final
        evaluation are done."""

    def close(self) -> None: ...
