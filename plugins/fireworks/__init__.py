"""Built-in plugin ``fireworks``: teachers and the student sampler on OpenAI-compatible servers.

Two backends sharing one client, each speaking its server's dialect: ``fireworks`` (token-id prompts; scoring by ``echo`` + ``logprobs`` + ``top_logprobs``
≤ 5, candidates resolved by ``token_id``; sampling with ``raw_output`` ids and both ``logprob`` and
``sampling_logprob``) and ``vllm`` (scoring by ``prompt_logprobs`` keyed by token id, capped by the
server's ``--max-logprobs``; sampling with ``return_token_ids``). The API key is read from the
environment variable named by ``api_key_env`` and never stored in the config. httpx is imported
only when a component is built. ``backend = "fireworks"`` with ``dialect = "vllm"`` is the old
spelling of ``backend = "vllm"``: it still works, with a deprecation warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import attrs

from distill import BuildContext, SamplerSpec, TeacherSpec, finite, hookimpl, non_negative, positive, resumable

__all__ = ["RemoteOptions", "RemoteTeacherOptions", "RemoteSamplerOptions", "FIREWORKS_TOP_LOGPROBS_CAP"]

FIREWORKS_TOP_LOGPROBS_CAP = 5


@attrs.frozen(kw_only=True)
class RemoteOptions:
    """Where the server is, how hard to try and how replies come: shared by teachers and the
    sampler. ``stream`` asks for server-sent events (Fireworks dialect only), for long requests
    behind proxies that cut idle connections; the events are assembled into the body a JSON reply
    would have been and validated the same way."""

    base_url: str = resumable()  # a restarted server may come back elsewhere
    model: str
    dialect: Literal["fireworks", "vllm"] | None = None  # deprecated: the backend names the dialect
    api_key_env: str = resumable(default="FIREWORKS_API_KEY")
    timeout_s: float = resumable(default=60.0, validator=[finite, positive])
    max_attempts: int = resumable(default=6, validator=positive)
    not_ready_wait_s: float = resumable(default=180.0, validator=[finite, non_negative])
    backoff_base_s: float = resumable(default=0.25, validator=[finite, positive])
    backoff_max_s: float = resumable(default=20.0, validator=[finite, positive])
    concurrency: int = resumable(default=8, validator=positive)
    max_concurrency: int = resumable(default=64, validator=positive)
    adaptive_concurrency: bool = resumable(default=True)
    stream: bool = resumable(default=False)


@attrs.frozen(kw_only=True)
class RemoteTeacherOptions(RemoteOptions):
    batch_size: int = resumable(default=16, validator=positive)
    max_failures_in_a_row: int = resumable(default=16, validator=positive)
    max_logprobs: int = resumable(default=20, validator=positive)


@attrs.frozen(kw_only=True)
class RemoteSamplerOptions(RemoteOptions):
    """``sync`` says how the server takes the trainer's weights after each step: ``vllm`` (write
    them to ``weights_dir``, ``/collective_rpc reload_weights``, reset the prefix cache),
    ``distill-serve`` (write them, ``POST /distill/v1/load_weights``), ``vllm-lora`` (a LoRA
    student's adapter alone, written to a new folder under ``weights_dir`` and loaded with
    ``/v1/load_lora_adapter`` as ``<model>-lora``, which the sampler then samples with) or ``none``
    (the server's weights never change: off-policy, for debugging). A LoRA student syncs merged
    weights with ``vllm`` and ``distill-serve``. ``server_weights_dir`` is the same folder as the
    server sees it. After every sync the server's logprobs on a probe sequence must match the
    trainer's within ``sync_tolerance`` (0 turns the check off)."""

    sync: Literal["auto", "vllm", "distill-serve", "vllm-lora", "none"] = "auto"
    weights_dir: str = resumable(default="")
    server_weights_dir: str = resumable(default="")
    sync_tolerance: float = resumable(default=1e-3, validator=[finite, non_negative])

    @property
    def sync_kind(self) -> str:
        if self.sync != "auto":
            return self.sync
        return "vllm" if self.dialect == "vllm" else "distill-serve"


Options = RemoteTeacherOptions | RemoteSamplerOptions


def _with_dialect(options: Options, backend: str, path: str) -> tuple[Options, list[str]]:
    """The options with the backend's dialect filled in, and any contradiction between the two."""
    if options.dialect is None or options.dialect == backend:
        return attrs.evolve(options, dialect=backend), []
    if backend == "fireworks":  # the old spelling of backend "vllm"
        warnings.warn(f"{path}: backend = \"fireworks\" with dialect = \"vllm\" is deprecated; write "
                      f"backend = \"vllm\"", FutureWarning, stacklevel=2)
        return options, []
    return options, [f"backend 'vllm' speaks the vllm dialect, got dialect = {options.dialect!r}; use "
                     f"backend = \"fireworks\" for a Fireworks server @ {path}.dialect"]


def _stream_problems(options: Options, path: str) -> list[str]:
    if options.stream and options.dialect != "fireworks":
        return [f"stream = true needs the fireworks dialect (server-sent events in its format) @ {path}.stream"]
    return []


def _check_teacher(backend: str) -> Callable[[RemoteTeacherOptions, BuildContext], list[str]]:
    def check(options: RemoteTeacherOptions, context: BuildContext) -> list[str]:
        """A top-K larger than the dialect returns is a config error naming the cap and the teacher."""
        options, problems = _with_dialect(options, backend, context.path)
        problems += _stream_problems(options, context.path)
        cap = FIREWORKS_TOP_LOGPROBS_CAP if options.dialect == "fireworks" else options.max_logprobs
        if context.top_k > cap:
            where = "the Fireworks API's cap of 5 top_logprobs" if options.dialect == "fireworks" else (
                f"the server's --max-logprobs ({cap}; set {context.path}.max_logprobs if it allows more)")
            problems.append(f"top_k {context.top_k} exceeds {where} for teacher '{context.teacher.name}' "
                            f"({context.path}) @ loss.top_k")
        return problems

    return check


def _check_sampler(backend: str) -> Callable[[RemoteSamplerOptions, BuildContext], list[str]]:
    def check(options: RemoteSamplerOptions, context: BuildContext) -> list[str]:
        """vLLM returns one kind of logprob per server (raw by default): the sampler needs both the
        behaviour and the raw logprob, the same only when sampling is unfiltered at T = 1."""
        options, problems = _with_dialect(options, backend, context.path)
        sampling = context.run_config.sampling
        if options.dialect == "fireworks":  # the API's caps: a request beyond them would be a 400 mid-run
            caps = {"sampling.temperature": (sampling.temperature, 2), "sampling.top_k": (sampling.top_k, 100),
                    "train.completions_per_prompt": (context.run_config.train.completions_per_prompt, 128)}
            problems += [f"{value} exceeds the Fireworks API's cap of {cap} @ {where}"
                         for where, (value, cap) in caps.items() if value > cap]
        problems += _stream_problems(options, context.path)
        problems += _adapter_sync_problems(options, context)
        if options.dialect == "vllm" and (sampling.temperature, sampling.top_k, sampling.top_p) != (1.0, 0, 1.0):
            problems.append("the vllm dialect returns raw logprobs only, which are the behaviour policy's only at "
                            "temperature 1 with no top_k/top_p: sample with those, or use a fireworks backend "
                            "(logprob and sampling_logprob) @ sampling")
        return problems

    return check


def _adapter_sync_problems(options: RemoteSamplerOptions, context: BuildContext) -> list[str]:
    """``vllm-lora`` needs a vLLM server and a trainer that trains an adapter (the ``torch`` trainer
    without ``[trainer.lora]`` does not; other trainers are checked once the student is built)."""
    if options.sync_kind != "vllm-lora":
        return []
    problems = []
    if options.dialect != "vllm":
        problems.append(f"sync = 'vllm-lora' loads the adapter through vLLM's /v1/load_lora_adapter: use "
                        f"backend = \"vllm\" @ {context.path}.sync")
    trainer = context.run_config.trainer
    if trainer.backend == "torch" and trainer.options.lora is None:
        problems.append(f"sync = 'vllm-lora' syncs the student's LoRA adapter, but the trainer trains none: add "
                        f"[trainer.lora], or sync merged weights with sync = 'vllm' @ {context.path}.sync")
    return problems


def _teacher_factory(backend: str) -> Callable[[RemoteTeacherOptions, BuildContext], Any]:
    def build(options: RemoteTeacherOptions, context: BuildContext) -> Any:
        from distill.plugins.fireworks.teacher import RemoteTeacher

        return RemoteTeacher.build(_with_dialect(options, backend, context.path)[0], context)

    return build


def _sampler_factory(backend: str) -> Callable[[RemoteSamplerOptions, BuildContext], Any]:
    def build(options: RemoteSamplerOptions, context: BuildContext) -> Any:
        from distill.plugins.fireworks.sampler import RemoteSampler

        return RemoteSampler.build(_with_dialect(options, backend, context.path)[0], context)

    return build


_SERVERS = {"fireworks": "Fireworks (or any server speaking its dialect)", "vllm": "vLLM"}


@hookimpl
def distill_teachers() -> list[TeacherSpec]:
    return [
        TeacherSpec(
            name=backend,
            summary=f"A teacher on a {server} server over HTTP.",
            config_cls=RemoteTeacherOptions,
            factory=_teacher_factory(backend),
            check=_check_teacher(backend),
            model_of=lambda options: options.model,
        )
        for backend, server in _SERVERS.items()
    ]


@hookimpl
def distill_samplers() -> list[SamplerSpec]:
    return [
        SamplerSpec(
            name=backend,
            summary=f"The student on a {server} server, its weights synced after every step.",
            config_cls=RemoteSamplerOptions,
            factory=_sampler_factory(backend),
            check=_check_sampler(backend),
        )
        for backend, server in _SERVERS.items()
    ]
