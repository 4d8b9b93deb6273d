"""The local teacher scorer: a frozen transformers model scoring exactly the student's tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distill import (
    BuildContext,
    ScoreRequest,
    TeacherScorer,
    TeacherScores,
    completion_positions,
    final_hidden_states,
    full_logprobs,
    head_weight,
    resolve_path,
)
from distill.plugins.hf.generation import greedy_complete, special_ids

__all__ = ["HFTeacher"]


class HFTeacher(TeacherScorer):
    supports_complete = True

    def __init__(self, model: Any, tokenizer: Any | None, batch_size: int) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def build(cls, options: Any, context: BuildContext) -> HFTeacher:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_path(options.model, context.run_config)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, options.dtype))
        model.to(options.device or context.device)
        tokenizer = None
        if Path(path, "tokenizer_config.json").exists() or not Path(path).exists():
            tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, options.batch_size)

    @torch.inference_mode()
    def _score_batch(self, requests: Sequence[ScoreRequest], top_k: int, hidden: bool) -> list[TeacherScores]:
        """One forward for the batch; then each request's completion positions are scored alone
        (the logits of one request are [C, V], and a matmul's rounding depends on its row count, so
        a request scores the same whatever it is batched with). With ``hidden`` each result also
        carries its [C, H] hidden states and the head itself (full-vocabulary losses)."""
        sequences = [list(r.prompt_ids) + list(r.completion_ids) for r in requests]
        L = max(len(s) for s in sequences) - 1
        input_ids = torch.zeros((len(requests), L), dtype=torch.long)
        attention = torch.zeros((len(requests), L), dtype=torch.long)
        for b, seq in enumerate(sequences):
            input_ids[b, : len(seq) - 1] = torch.tensor(seq[:-1])
            attention[b, : len(seq) - 1] = 1
        device = self.model.device
        hidden_B_L_H = final_hidden_states(self.model, input_ids.to(device), attention.to(device))
        weight_V_H = head_weight(self.model)
        results = []
        for b, request in enumerate(requests):
            hidden_C_H = hidden_B_L_H[b, completion_positions(len(request.prompt_ids), len(request.completion_ids))]
            logprobs_C_V = full_logprobs(hidden_C_H, weight_V_H)
            targets_C = torch.tensor(request.completion_ids, device=device)
            fields = {"logprobs_C": logprobs_C_V.gather(1, targets_C[:, None])[:, 0].cpu()}
            if top_k:
                top = torch.topk(logprobs_C_V, min(top_k, logprobs_C_V.shape[-1]), dim=-1)
                fields.update(topk_ids_C_K=top.indices.cpu(), topk_logprobs_C_K=top.values.cpu())
            if hidden:
                fields.update(hidden_C_G=hidden_C_H, head_V_G=weight_V_H)
            results.append(TeacherScores(**fields))
        return results

    async def score(self, requests: Sequence[ScoreRequest], *, top_k: int, hidden: bool = False) -> list[TeacherScores]:
        """Scores in a worker thread (torch releases the GIL), so teachers score concurrently."""
        results: list[TeacherScores] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            results.extend(await asyncio.to_thread(self._score_batch, chunk, top_k, hidden))
        return results

    async def complete(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int) -> list[list[int]]:
        """Greedy completions, so a run can report the teacher's own accuracy."""
        eos, pad = special_ids(self.model)
        return await asyncio.to_thread(greedy_complete, self.model, prompts, max_new_tokens, eos, pad, self.batch_size)
