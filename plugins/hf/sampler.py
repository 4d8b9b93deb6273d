"""The local student sampler: samples with the trainer's live model, so weight sync is free.

When the run pipelines (``train.max_staleness = 1``), the next step is sampled while the trainer
updates the weights, so the sampler keeps its own copy and ``sync_weights`` copies the trainer's
weights into it (a memory copy, between steps). Sampling runs in a worker thread either way (torch
releases the GIL), so it overlaps whatever else the event loop runs.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence
from typing import Any

import torch

from distill import BuildContext, ConfigError, PromptRow, Rollout, Sampler, SamplingParams
from distill.plugins.hf.generation import generate, greedy_complete

__all__ = ["HFSampler"]


class HFSampler(Sampler):
    def __init__(self, model: Any, tokenizer: Any, batch_size: int, *, trainer_model: Any = None) -> None:
        self.model = model
        self.trainer_model = trainer_model  # set when ``model`` is a copy to keep in sync
        self.batch_size = batch_size
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    @classmethod
    def build(cls, options: Any, context: BuildContext) -> HFSampler:
        if context.student is None:
            raise ConfigError(["sampler 'hf' samples from a local student model, none is loaded @ sampler.backend"])
        if context.run_config.train.max_staleness == 0:
            return cls(context.student, context.tokenizer, options.batch_size)
        own = copy.deepcopy(context.student).requires_grad_(False)
        return cls(own, context.tokenizer, options.batch_size, trainer_model=context.student)

    async def sample(
        self, rows: Sequence[PromptRow], params: SamplingParams, *, seed: int
    ) -> list[Rollout]:
        return await asyncio.to_thread(self._sample, rows, params, seed)

    def _sample(self, rows: Sequence[PromptRow], params: SamplingParams, seed: int) -> list[Rollout]:
        generator = torch.Generator().manual_seed(seed)
        jobs = [row for row in rows for _ in range(params.n)]
        rollouts: list[Rollout] = []
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            outputs = generate(
                self.model,
                [row.prompt_ids for row in chunk],
                max_new_tokens=params.max_new_tokens,
                eos_id=self.eos_id,
                pad_id=self.pad_id,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                generator=generator,
            )
            rollouts.extend(
                Rollout(
                    row=row,
                    completion_ids_C=out.ids_C,
                    sampling_logprobs_C=out.sampling_logprobs_C,
                    model_logprobs_C=out.model_logprobs_C,
                    finished=out.finished,
                )
                for row, out in zip(chunk, outputs, strict=True)
            )
        return rollouts

    async def complete(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int) -> list[list[int]]:
        """Greedy completions (used by evaluation), with the trainer's current weights."""
        model = self.trainer_model if self.trainer_model is not None else self.model
        return await asyncio.to_thread(greedy_complete, model, prompts, max_new_tokens, self.eos_id, self.pad_id,
                                       self.batch_size)

    async def sync_weights(self, step: int) -> None:
        """Nothing to do when sharing the trainer's model; else copy its weights into ours."""
        if self.trainer_model is not None:
            with torch.no_grad():
                for ours, theirs in zip(self.model.parameters(), self.trainer_model.parameters(), strict=True):
                    ours.copy_(theirs)

