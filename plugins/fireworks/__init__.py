"""Built-in plugin ``fireworks``: teachers behind OpenAI-compatible completion servers over HTTP.

Two dialects: ``fireworks`` (token-id prompts, ``echo`` + ``logprobs`` + ``top_logprobs`` ≤ 5,
candidates resolved by ``token_id``) and ``vllm`` (``prompt_logprobs`` keyed by token id, capped
by the server's ``--max-logprobs``). The API key is read from the environment variable named by
``api_key_env`` and never stored in the config. httpx is imported only when a teacher is built.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from distill import BuildContext, TeacherSpec, hookimpl
from distill.config import RunConfig, finite, positive

__all__ = ["RemoteTeacherOptions", "FIREWORKS_TOP_LOGPROBS_CAP"]

FIREWORKS_TOP_LOGPROBS_CAP = 5


@attrs.frozen(kw_only=True)
class RemoteTeacherOptions:
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
    max_failures_in_a_row: int = attrs.field(default=16, validator=positive)
    max_logprobs: int = attrs.field(default=20, validator=positive)
    batch_size: int = attrs.field(default=16, validator=positive)


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


def _build_teacher(options: RemoteTeacherOptions, context: BuildContext) -> Any:
    from distill.plugins.fireworks.teacher import RemoteTeacher

    return RemoteTeacher.build(options, context)


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
