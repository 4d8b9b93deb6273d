"""The student on a completions server: it samples there, trains here, and takes the new weights
after every step.

Strict on-policy over HTTP. After each optimizer step the trainer's weights are written to a folder
the server reads and the server reloads them; then a probe sequence is scored on both sides, and a
server that answers with other logprobs than the trainer's (a reload that silently failed, a stale
tied head) stops the run, rather than letting it train on another policy's samples.
"""

from __future__ import annotations

import asyncio
import copy
import os
import posixpath
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import torch

from distill import (
    BuildContext,
    ConfigError,
    DistillError,
    PromptRow,
    Rollout,
    Sampler,
    SamplingParams,
    ScoreRequest,
    distributed,
    final_hidden_states,
    full_logprobs,
    head_weight,
)
from distill.plugins.fireworks.client import (
    Invalid,
    JsonClient,
    RequestFailed,
    client_for,
    finite,
    indexed_choices,
)
from distill.plugins.fireworks.teacher import scoring_request

__all__ = ["RemoteSampler", "Sample", "parse_completion_ids", "parse_fireworks_samples", "parse_vllm_samples",
           "served_weights", "write_weights"]

log = structlog.get_logger("distill")
PROBE_LENGTH = 16
CONTROL_NOT_READY = frozenset({425})  # a sync endpoint's 404 means it does not exist: fail fast with a hint
MISSING_ENDPOINT_HINTS = {  # what to do when the server has no sync endpoint (404)
    "vllm": "; start vLLM with VLLM_SERVER_DEV_MODE=1 (it serves /collective_rpc and /reset_prefix_cache)",
    "distill-serve": "; point the sampler at a distill-serve server (it serves /distill/v1/load_weights)",
    "vllm-lora": "; start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (it then serves "
                 "/v1/load_lora_adapter)",
}
ADAPTER_SUFFIX = "-lora"  # sync = "vllm-lora" samples with the adapter named after the server's model


@attrs.frozen
class Sample:
    """One parsed completion: ids, behaviour and raw logprobs, and whether it ended with EOS."""

    ids: list[int]
    sampling_logprobs: list[float]
    model_logprobs: list[float]
    finished: bool


def _checked(ids: Any, max_tokens: int) -> list[int]:
    if not isinstance(ids, list) or not 1 <= len(ids) <= max_tokens:
        raise Invalid("bad_length")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise Invalid("bad_token_id")
    return ids


def parse_completion_ids(body: Any, dialect: str, max_tokens: int) -> list[int]:
    """Only the ids of a single greedy completion (evaluation needs no logprobs)."""
    try:
        (choice,) = indexed_choices(body, 1)
        ids = choice["raw_output"]["completion_token_ids"] if dialect == "fireworks" else choice["token_ids"]
    except (KeyError, IndexError, TypeError, ValueError):
        raise Invalid("malformed") from None
    return _checked(ids, max_tokens)


NO_SAMPLING_LOGPROB = (
    "The student's server does not report sampling_logprob (the behaviour policy's logprob, after "
    "temperature and filters), and its logprob is the behaviour policy's only at temperature 1 with no "
    "top_k/top_p: sample with temperature = 1, top_k = 0, top_p = 1, or serve the student where "
    "sampling_logprob is reported (Fireworks, distill-serve)."
)


def _behaviour_logprob(entry: Any, raw_is_behaviour: bool) -> float:
    """``sampling_logprob``, optional in the API: without it ``logprob`` is exact only when sampling
    is unfiltered at temperature 1 (the Fireworks SDK falls back the same way), else the run stops."""
    if entry.get("sampling_logprob") is not None:
        return finite(entry["sampling_logprob"], "non_finite_logprob")
    if not raw_is_behaviour:
        raise DistillError(NO_SAMPLING_LOGPROB)
    return finite(entry["logprob"], "non_finite_logprob")


def parse_fireworks_samples(body: Any, n: int, max_tokens: int, raw_is_behaviour: bool = False) -> list[Sample]:
    """Ids from ``raw_output.completion_token_ids``; ``content[i]`` must carry the same ``token_id``
    with a finite ``logprob`` (raw model) and ``sampling_logprob`` (after temperature and filters),
    which may be absent when ``raw_is_behaviour`` (temperature 1, no top-k/top-p)."""
    try:
        samples = []
        for choice in indexed_choices(body, n):
            ids = _checked(choice["raw_output"]["completion_token_ids"], max_tokens)
            content = choice["logprobs"]["content"]
            if len(content) != len(ids) or any(e["token_id"] != i for e, i in zip(content, ids, strict=True)):
                raise Invalid("ids_mismatch")
            samples.append(Sample(
                ids,
                [_behaviour_logprob(e, raw_is_behaviour) for e in content],
                [finite(e["logprob"], "non_finite_logprob") for e in content],
                choice["finish_reason"] == "stop",
            ))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise Invalid("malformed") from None
    return samples


def parse_vllm_samples(body: Any, n: int, max_tokens: int) -> list[Sample]:
    """Ids from ``token_ids`` (``return_token_ids``), one finite logprob per id; vLLM returns raw
    model logprobs, which are the behaviour policy's at temperature 1 with no filters (checked at
    config time)."""
    try:
        samples = []
        for choice in indexed_choices(body, n):
            ids = _checked(choice["token_ids"], max_tokens)
            logprobs = choice["logprobs"]["token_logprobs"]
            if len(logprobs) != len(ids):
                raise Invalid("ids_mismatch")
            values = [finite(lp, "non_finite_logprob") for lp in logprobs]
            samples.append(Sample(ids, values, values, choice["finish_reason"] == "stop"))
    except (KeyError, IndexError, TypeError, ValueError):
        raise Invalid("malformed") from None
    return samples


@torch.no_grad()
def served_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s state dict under the plain model's names, as a server loads it, one tensor at a time.

    A PEFT model (a LoRA student) is given as ``merge_and_unload`` would make it, without touching
    it: each adapted layer is copied alone and merged by peft as its tensors come, so the trainer
    keeps its exact weights (merging in place and unmerging is not exact: ``(W + ΔW) − ΔW`` differs
    from ``W`` in the last bits) and a consumer that moves each tensor off the device holds at most
    one extra layer there."""
    if not _is_peft(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    base = model.get_base_model()
    wrapped = {name: module for name, module in base.named_modules()
               if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))}
    merged: set[str] = set()
    for key, tensor in base.state_dict().items():
        parts = key.split(".")
        owner = next((name for name in (".".join(parts[:i]) for i in range(1, len(parts))) if name in wrapped), None)
        if owner is None:
            yield key, tensor
        elif owner not in merged:  # the outermost wrapper: its first tensor stands for the whole layer
            merged.add(owner)
            yield from _merged_copy(wrapped[owner]).state_dict(prefix=f"{owner}.").items()


def _is_peft(model: Any) -> bool:
    """Whether ``model`` is a PEFT model (it cannot be while peft is not even imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _merged_copy(module: Any) -> Any:
    """The plain module a PEFT wrapper stands for, its adapter merged by peft, from a copy."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    module = copy.deepcopy(module)
    if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save, trainable tokens
        return module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
    module.merge()
    return module.get_base_layer()


def write_weights(model: Any, folder: Path) -> None:
    """Write :func:`served_weights` as ``model.safetensors``, atomically (a server reading the
    folder sees the old file or the new one, never half of one).

    A tied head is written under its own name too: vLLM (0.32) reloading in place from a folder
    without ``lm_head.weight`` (as ``save_pretrained`` writes tied models) serves wrong logprobs."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in served_weights(model):
        tensor = tensor.detach().cpu()
        tensors[name] = tensor.clone() if tensor.data_ptr() in seen else tensor.contiguous()
        seen.add(tensor.data_ptr())
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "model.safetensors.partial"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, folder / "model.safetensors")


@torch.no_grad()
def _local_logprobs(model: Any, ids: Sequence[int]) -> torch.Tensor:
    """The trainer's logprob of ``ids[1:]``, each given the ids before it."""
    was_training = model.training
    model.eval()
    try:
        input_ids = torch.tensor([list(ids)], device=model.device)
        hidden = final_hidden_states(model, input_ids, torch.ones_like(input_ids))[0, :-1]
        return full_logprobs(hidden, head_weight(model)).gather(1, input_ids[0, 1:, None]).squeeze(1).cpu()
    finally:
        model.train(was_training)


class RemoteSampler(Sampler):
    """One request per prompt (``n`` completions, its own seed); concurrency bounded by the client's
    AIMD window. A request that keeps failing stops the run: a step cannot train on missing rows'
    samples without changing what it trains on."""

    def __init__(
        self,
        client: JsonClient,
        *,
        model: str,
        dialect: str,
        student: Any,
        sync: str,
        weights_dir: Path,
        server_weights_dir: str,
        sync_tolerance: float,
        stream: bool = False,
    ) -> None:
        self.client = client
        self.model = model
        self.dialect = dialect
        self.student = student
        self.sync = sync
        self.weights_dir = weights_dir
        self.server_weights_dir = server_weights_dir
        self.sync_tolerance = sync_tolerance
        self.stream = stream
        vocab = student.get_output_embeddings().weight.shape[0]
        self.probe = [(7 * i + 3) % vocab for i in range(PROBE_LENGTH)]
        self.syncs = 0
        self.sync_s = 0.0
        self.sync_gap = 0.0
        self.whole: Any = None  # sharded student: the main process's whole copy, which it writes and probes

    @classmethod
    def build(cls, options: Any, context: BuildContext) -> RemoteSampler:
        if context.student is None:
            raise ConfigError(["sampler 'fireworks' syncs the trainer's student, none is loaded @ sampler.backend"])
        weights_dir = Path(options.weights_dir) if options.weights_dir else context.output_dir / "sampler_weights"
        if options.sync_kind == "none":
            log.warning("sampler sync = 'none': the server's weights never change, so training is off-policy",
                        model=options.model)
        if options.sync_kind == "vllm-lora" and not _is_peft(context.student):
            raise ConfigError([f"sync = 'vllm-lora' loads the trainer's LoRA adapter into vLLM, but the student "
                               f"is no PEFT model: train LoRA ([trainer.lora]), or sync merged weights with "
                               f"sync = 'vllm' @ {context.path or 'sampler'}.sync"])
        adapter = options.sync_kind == "vllm-lora"
        return cls(
            client_for(options, context.seed),
            model=options.model + ADAPTER_SUFFIX if adapter else options.model,
            dialect=options.dialect or "fireworks",
            student=context.student,
            sync=options.sync_kind,
            weights_dir=weights_dir.resolve(),
            server_weights_dir=options.server_weights_dir or str(weights_dir.resolve()),
            sync_tolerance=options.sync_tolerance,
            stream=options.stream,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def counters(self) -> dict[str, Any]:
        return {**self.state_dict(), "sync_s": round(self.sync_s, 3)}

    def state_dict(self) -> dict[str, Any]:
        return {**self.client.state_dict(), "syncs": self.syncs, "sync_s": self.sync_s, "sync_max_gap": self.sync_gap}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.client.load_state_dict(state)
        self.syncs, self.sync_s, self.sync_gap = state["syncs"], state["sync_s"], state["sync_max_gap"]

    async def _post(self, path: str, body: dict[str, Any] | None, parse: Any = None) -> Any:
        try:
            return await self.client.post(path, body, parse)
        except RequestFailed as failed:
            raise DistillError(
                f"The student's server {self.model!r} failed: {failed}. The last checkpoint is intact: "
                f"fix the server and rerun to resume."
            ) from None

    def _body(self, prompt: Sequence[int], n: int, max_tokens: int, temperature: float, top_k: int,
              top_p: float, seed: int) -> dict[str, Any]:
        body = {"model": self.model, "prompt": list(prompt), "max_tokens": max_tokens, "n": n,
                "temperature": temperature, "top_p": top_p, "seed": seed}
        if self.dialect == "fireworks":
            return {**body, "top_k": top_k, "logprobs": True, "raw_output": True, "stream": self.stream}
        return {**body, "top_k": top_k or -1, "logprobs": 0, "return_token_ids": True}

    async def _sample_one(self, prompt: Sequence[int], params: SamplingParams, seed: int) -> list[Sample]:
        body = self._body(prompt, params.n, params.max_new_tokens, params.temperature, params.top_k, params.top_p, seed)
        if self.dialect == "fireworks":
            raw_is_behaviour = (params.temperature, params.top_k, params.top_p) == (1.0, 0, 1.0)
            return await self._post(self._path, body, lambda reply: parse_fireworks_samples(
                reply, params.n, params.max_new_tokens, raw_is_behaviour))
        return await self._post(self._path, body, lambda reply: parse_vllm_samples(reply, params.n, params.max_new_tokens))

    async def _complete_one(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        body = self._body(prompt, 1, max_new_tokens, 0.0, 0, 1.0, 0)
        return await self._post(self._path, body,
                                lambda reply: parse_completion_ids(reply, self.dialect, max_new_tokens))

    @property
    def _path(self) -> str:
        return "/inference/v1/completions" if self.dialect == "fireworks" else "/v1/completions"

    async def sample(self, rows: Sequence[PromptRow], params: SamplingParams, *, seeds: Sequence[int]) -> list[Rollout]:
        requests = [self._sample_one(row.prompt_ids, params, seed) for row, seed in zip(rows, seeds, strict=True)]
        results = await asyncio.gather(*requests)
        return [
            Rollout(
                row=row,
                completion_ids_C=torch.tensor(s.ids, dtype=torch.long),
                sampling_logprobs_C=torch.tensor(s.sampling_logprobs),
                model_logprobs_C=torch.tensor(s.model_logprobs),
                finished=s.finished,
            )
            for row, samples in zip(rows, results, strict=True)
            for s in samples
        ]

    async def complete(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int) -> list[list[int]]:
        """Greedy completions (temperature 0), used by evaluation."""
        return list(await asyncio.gather(*(self._complete_one(p, max_new_tokens) for p in prompts)))

    async def sync_weights(self, step: int) -> None:
        """Write the weights, have the server reload them, and check it now answers as the trainer.

        With the student sharded over processes (torchrun), every process gathers the weights, the
        main process alone writes them and has the server reload, and the others wait for it."""
        if self.sync == "none":
            return
        started = time.perf_counter()
        if distributed.sharded():
            self.whole = await asyncio.to_thread(distributed.whole_copy, self.student, self.whole)
            if not distributed.is_main():
                distributed.barrier()  # sampling before the reload would use the old weights
                return
        try:
            if self.sync == "vllm-lora":
                await self._load_adapter(step)
            else:
                await asyncio.to_thread(write_weights, self._local_student, self.weights_dir)
            if self.sync == "vllm":
                await self.client.post("/collective_rpc", {"method": "reload_weights",
                                                          "kwargs": {"weights_path": self.server_weights_dir}},
                                       not_ready=CONTROL_NOT_READY)
                await self.client.post("/reset_prefix_cache", None, not_ready=CONTROL_NOT_READY)
            elif self.sync == "distill-serve":
                await self.client.post("/distill/v1/load_weights", {"path": self.server_weights_dir},
                                       not_ready=CONTROL_NOT_READY)
        except RequestFailed as failed:
            hint = MISSING_ENDPOINT_HINTS[self.sync] if failed.reason == "http_404" else ""
            raise DistillError(f"Weight sync to {self.model!r} failed: {failed}{hint}.") from None
        if self.sync_tolerance:
            await self._check_sync(step)
        distributed.barrier()
        self.syncs += 1
        self.sync_s += time.perf_counter() - started

    async def _load_adapter(self, step: int) -> None:
        """Save the adapter alone to a new folder and have vLLM load it in place of the last one, under
        the same name; then remove the older folders.

        A new folder every time: vLLM keys cached prefixes by the adapter's name and path, so reloading
        from the same path would answer cached prompts with the previous weights."""
        folder = f"adapter-{step}-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(self._local_student.save_pretrained, str(self.weights_dir / folder))
        body = {"lora_name": self.model, "lora_path": posixpath.join(self.server_weights_dir, folder),
                "load_inplace": True}
        await self.client.post("/v1/load_lora_adapter", body, not_ready=CONTROL_NOT_READY)
        for old in self.weights_dir.glob("adapter-*"):
            if old.name != folder:
                shutil.rmtree(old, ignore_errors=True)

    @property
    def _local_student(self) -> Any:
        """The student whose weights this process writes and probes: whole, never sharded."""
        return self.whole if self.whole is not None else self.student

    async def _check_sync(self, step: int) -> None:
        probe = self.probe
        path, body, parse = scoring_request(self.dialect, self.model,
                                            [ScoreRequest(prompt_ids=tuple(probe[:1]), completion_ids=tuple(probe[1:]))], 0)
        (scores,) = await self._post(path, body, parse)
        local = await asyncio.to_thread(_local_logprobs, self._local_student, probe)
        gap = float((scores.logprobs_C - local).abs().max())
        self.sync_gap = max(self.sync_gap, gap)
        if gap > self.sync_tolerance:
            raise DistillError(
                f"After the weight sync at step {step} the student's server answers logprobs up to {gap:.3g} "
                f"away from the trainer's (sync_tolerance {self.sync_tolerance:g}): it is not serving the "
                f"trained weights. Check that it reads the folder the trainer writes ({self.weights_dir}; "
                f"set server_weights_dir to that folder as the server sees it); a bf16 server needs a "
                f"larger sync_tolerance."
            )
