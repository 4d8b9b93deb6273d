"""The local student sampler: samples with the trainer's live model, so weight sync is free.

When the run pipelines (``train.max_staleness = 1``), the next step is sampled while the trainer
updates the weights, so the sampler keeps its own copy and ``sync_weights`` copies the trainer's
weights into it (a memory copy, between steps). Under torchrun the trainer's model is sharded over
the processes: each keeps a whole copy to sample with, and ``sync_weights`` gathers the shards into
it (the cost: one model's memory per process, one all-gather of the weights per step). Sampling runs in a worker thread either way (torch
releases the GIL), so it overlaps whatever else the event loop runs.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence
from typing import Any

import torch

from distill import BuildContext, ConfigError, PromptRow, Rollout, Sampler, SamplingParams, distributed, sample_seed
from distill.plugins.hf.generation import generate, greedy_complete

__all__ = ["HFSampler"]


class HFSampler(Sampler):
    def __init__(self, model: Any, tokenizer: Any, batch_size: int, *, trainer_model: Any = None) -> None:
        self.model = model
        self.trainer_model = trainer_model  # set when ``model`` is a copy to keep in sync
        self.frozen_synced = False
        self.batch_size = batch_size
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    @classmethod
    def build(cls, options: Any, context: BuildContext) -> HFSampler:
        if context.student is None:
            raise ConfigError(["sampler 'hf' samples from a local student model, none is loaded @ sampler.backend"])
        sharded = distributed.sharded()
        if context.run_config.train.max_staleness == 0 and not sharded:
            return cls(context.student, context.tokenizer, options.batch_size)
        if sharded:  # a whole copy: decoding through the shards would gather every layer per token
            own = distributed.unsharded_like(context.student).to(context.student.device)
        else:
            own = copy.deepcopy(context.student)
        return cls(own.requires_grad_(False), context.tokenizer, options.batch_size, trainer_model=context.student)

    async def sample(
        self, rows: Sequence[PromptRow], params: SamplingParams, *, seeds: Sequence[int]
    ) -> list[Rollout]:
        return await asyncio.to_thread(self._sample, rows, params, seeds)

    def _sample(self, rows: Sequence[PromptRow], params: SamplingParams, seeds: Sequence[int]) -> list[Rollout]:
        # completion j of a row: its own seed, from the row's
        jobs = [(row, sample_seed(seed, j)) for row, seed in zip(rows, seeds, strict=True) for j in range(params.n)]
        rollouts: list[Rollout] = []
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            outputs = generate(
                self.model,
                [row.prompt_ids for row, _ in chunk],
                max_new_tokens=params.max_new_tokens,
                eos_id=self.eos_id,
                pad_id=self.pad_id,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                seeds=[seed for _, seed in chunk],
            )
            rollouts.extend(
                Rollout(
                    row=row,
                    completion_ids_C=out.ids_C,
                    sampling_logprobs_C=out.sampling_logprobs_C,
                    model_logprobs_C=out.model_logprobs_C,
                    finished=out.finished,
                )
                for (row, _), out in zip(chunk, outputs, strict=True)
            )
        return rollouts

    async def complete(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int) -> list[list[int]]:
        """Greedy completions (used by evaluation), with the trainer's weights as last synced."""
        return await asyncio.to_thread(greedy_complete, self.model, prompts, max_new_tokens, self.eos_id, self.pad_id,
                                       self.batch_size)

    async def sync_weights(self, step: int) -> None:
        """Nothing to do when sharing the trainer's model; else copy its weights into ours (sharded:
        gathered whole, every process at once). Frozen weights (LoRA's base) are copied once."""
        if self.trainer_model is None:
            return
        with torch.no_grad():
            for ours, theirs in zip(self.model.parameters(), self.trainer_model.parameters(), strict=True):
                if theirs.requires_grad or not self.frozen_synced:
                    ours.copy_(distributed.full_tensor(theirs))
        self.frozen_synced = True

