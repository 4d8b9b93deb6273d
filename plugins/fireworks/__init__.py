"""Built-in plugin ``fireworks``: teachers and the student sampler on OpenAI-compatible servers.

Two dialects: ``fireworks`` (token-id prompts; scoring by ``echo`` + ``logprobs`` + ``top_logprobs``
≤ 5, candidates resolved by ``token_id``; sampling with ``raw_output`` ids and both ``logprob`` and
``sampling_logprob``) and ``vllm`` (scoring by ``prompt_logprobs`` keyed by token id, capped by the
server's ``--max-logprobs``; sampling with ``return_token_ids``). The API key is read from the
environment variable named by ``api_key_env`` and never stored in the config. httpx is imported
only when a component is built.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from distill import BuildContext, SamplerSpec, TeacherSpec, hookimpl
from distill.config import RunConfig, finite, non_negative, positive

__all__ = ["RemoteOptions", "RemoteTeacherOptions", "RemoteSamplerOptions", "FIREWORKS_TOP_LOGPROBS_CAP"]

FIREWORKS_TOP_LOGPROBS_CAP = 5


@attrs.frozen(kw_only=True)
class RemoteOptions:
    """Where the server is and how hard to try: shared by teachers and the sampler."""

    base_url: str
    model: str
    dialect: Literal["fireworks", "vllm"] = "fireworks"
    api_key_env: str = "FIREWORKS_API_KEY"
    timeout_s: float = attrs.field(default=60.0, validator=[finite, positive])
    max_attempts: int = attrs.field(default=6, validator=positive)
    backoff_base_s: float = attrs.field(default=0.25, validator=[finite, positive])
    backoff_max_s: float = attrs.field(default=20.0, validator=[finite, positive])
    concurrency: int = attrs.field(default=8, validator=positive)
    max_concurrency: int = attrs.field(default=64, validator=positive)
    adaptive_concurrency: bool = True


@attrs.frozen(kw_only=True)
class RemoteTeacherOptions(RemoteOptions):
    batch_size: int = attrs.field(default=16, validator=positive)
    max_failures_in_a_row: int = attrs.field(default=16, validator=positive)
    max_logprobs: int = attrs.field(default=20, validator=positive)


@attrs.frozen(kw_only=True)
class RemoteSamplerOptions(RemoteOptions):
    """``sync`` says how the server takes the trainer's weights after each step: ``vllm`` (write
    them to ``weights_dir``, ``/collective_rpc reload_weights``, reset the prefix cache),
    ``distill-serve`` (write them, ``POST /distill/v1/load_weights``) or ``none`` (the server's
    weights never change: off-policy, for debugging). ``server_weights_dir`` is the same folder as
    the server sees it. After every sync the server's logprobs on a probe sequence must match the
    trainer's within ``sync_tolerance`` (0 turns the check off)."""

    sync: Literal["auto", "vllm", "distill-serve", "none"] = "auto"
    weights_dir: str = ""
    server_weights_dir: str = ""
    sync_tolerance: float = attrs.field(default=1e-3, validator=[finite, non_negative])

    @property
    def sync_kind(self) -> str:
        if self.sync != "auto":
            return self.sync
        return "vllm" if self.dialect == "vllm" else "distill-serve"


def _check(options: RemoteTeacherOptions, config: RunConfig) -> list[str]:
    """A top-K larger than the dialect returns is a config error naming the cap."""
    top_k = getattr(config.loss.options, "top_k", 0)
    cap = FIREWORKS_TOP_LOGPROBS_CAP if options.dialect == "fireworks" else options.max_logprobs
    if top_k <= cap:
        return []
    index = next(i for i, t in enumerate(config.teachers) if t.options is options)
    where = "the Fireworks API's cap of 5 top_logprobs" if options.dialect == "fireworks" else (
        f"the server's --max-logprobs ({cap}; set teachers[{index}].max_logprobs if it allows more)")
    return [f"top_k {top_k} exceeds {where} for teacher teachers[{index}] @ loss.top_k"]


def _check_sampler(options: RemoteSamplerOptions, config: RunConfig) -> list[str]:
    """vLLM returns one kind of logprob per server (raw by default): the sampler needs both the
    behaviour and the raw logprob, which are the same only when sampling is unfiltered at T = 1."""
    sampling = config.sampling
    if options.dialect != "vllm" or (sampling.temperature, sampling.top_k, sampling.top_p) == (1.0, 0, 1.0):
        return []
    return [("the vllm dialect returns raw logprobs only, which are the behaviour policy's only at "
             "temperature 1 with no top_k/top_p: sample with those, or use the fireworks dialect "
             "(logprob and sampling_logprob) @ sampling")]


def _build_teacher(options: RemoteTeacherOptions, context: BuildContext) -> Any:
    from distill.plugins.fireworks.teacher import RemoteTeacher

    return RemoteTeacher.build(options, context)


def _build_sampler(options: RemoteSamplerOptions, context: BuildContext) -> Any:
    from distill.plugins.fireworks.sampler import RemoteSampler

    return RemoteSampler.build(options, context)


@hookimpl
def distill_teachers() -> list[TeacherSpec]:
    return [
        TeacherSpec(
            name="fireworks",
            summary="A teacher on an OpenAI-compatible server (Fireworks or vLLM dialect) over HTTP.",
            config_cls=RemoteTeacherOptions,
            factory=_build_teacher,
            check=_check,
        )
    ]


@hookimpl
def distill_samplers() -> list[SamplerSpec]:
    return [
        SamplerSpec(
            name="fireworks",
            summary="The student on an OpenAI-compatible server (Fireworks or vLLM dialect), weights synced each step.",
            config_cls=RemoteSamplerOptions,
            factory=_build_sampler,
            check=_check_sampler,
        )
    ]
