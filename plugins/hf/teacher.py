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

__all__ = ["HFTeacher", "LOGITS_BUDGET"]

LOGITS_BUDGET = 1 << 25  # fp32 logits scored at once (128 MiB): a batch of a big-vocabulary teacher


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
    def _score_batch(self, requests: Sequence[ScoreRequest], top_k: int) -> list[TeacherScores]:
        """One forward for the batch, then the completion positions of every request gathered into
        [N, H] and scored in row chunks of at most ``LOGITS_BUDGET`` logits."""
        sequences = [list(r.prompt_ids) + list(r.completion_ids) for r in requests]
        L = max(len(s) for s in sequences) - 1
        input_ids = torch.zeros((len(requests), L), dtype=torch.long)
        attention = torch.zeros((len(requests), L), dtype=torch.long)
        rows, columns = [], []
        for b, (request, seq) in enumerate(zip(requests, sequences, strict=True)):
            input_ids[b, : len(seq) - 1] = torch.tensor(seq[:-1])
            attention[b, : len(seq) - 1] = 1
            span = completion_positions(len(request.prompt_ids), len(request.completion_ids))
            rows += [b] * (span.stop - span.start)
            columns += range(span.start, span.stop)
        device = self.model.device
        hidden_B_L_H = final_hidden_states(self.model, input_ids.to(device), attention.to(device))
        hidden_N_H = hidden_B_L_H[torch.tensor(rows, device=device), torch.tensor(columns, device=device)]
        targets_N = torch.tensor([t for r in requests for t in r.completion_ids], device=device)
        weight_V_H = head_weight(self.model)
        chunk = max(1, LOGITS_BUDGET // weight_V_H.shape[0])
        picked, top_ids, top_logprobs = [], [], []
        for start in range(0, hidden_N_H.shape[0], chunk):
            logprobs_C_V = full_logprobs(hidden_N_H[start : start + chunk], weight_V_H)
            picked.append(logprobs_C_V.gather(1, targets_N[start : start + chunk, None])[:, 0])
            if top_k:
                top = torch.topk(logprobs_C_V, min(top_k, logprobs_C_V.shape[-1]), dim=-1)
                top_ids.append(top.indices)
                top_logprobs.append(top.values)
        lengths = [len(r.completion_ids) for r in requests]
        logprobs = torch.cat(picked).cpu().split(lengths)
        if not top_k:
            return [TeacherScores(logprobs_C=lp) for lp in logprobs]
        ids, values = torch.cat(top_ids).cpu().split(lengths), torch.cat(top_logprobs).cpu().split(lengths)
        return [TeacherScores(logprobs_C=lp, topk_ids_C_K=i, topk_logprobs_C_K=v)
                for lp, i, v in zip(logprobs, ids, values, strict=True)]

    async def score(self, requests: Sequence[ScoreRequest], *, top_k: int) -> list[TeacherScores]:
        """Scores in a worker thread (torch releases the GIL), so teachers score concurrently."""
        results: list[TeacherScores] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            results.extend(await asyncio.to_thread(self._score_batch, chunk, top_k))
        return results

    async def complete(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int) -> list[list[int]]:
        """Greedy completions, so a run can report the teacher's own accuracy."""
        eos, pad = special_ids(self.model)
        return await asyncio.to_thread(greedy_complete, self.model, prompts, max_new_tokens, eos, pad, self.batch_size)
