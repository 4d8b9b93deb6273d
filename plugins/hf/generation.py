"""KV-cached batched sampling with explicit temperature / top-k / top-p, recording two logprobs.

Written out rather than calling ``generate`` because the behaviour-policy logprob must be exactly
the distribution that sampled (``generate`` applies hidden defaults such as ``top_k=50``) and
sampling must be seeded so a resumed run repeats it bit for bit. Each prompt draws from its own
seed (inverse-CDF sampling on uniforms from a generator of its own), so what a prompt samples does
not depend on the other prompts in the batch (up to rounding in the batched forward pass): split a
step across processes and each row still gets the completions one process would have given it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import attrs
import torch

__all__ = ["Generated", "generate", "greedy_complete", "special_ids"]


@attrs.frozen(eq=False)
class Generated:
    ids_C: torch.Tensor
    sampling_logprobs_C: torch.Tensor
    model_logprobs_C: torch.Tensor
    finished: bool


def _filter(logits_B_V: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set holding top_p of the mass."""
    if 0 < top_k < logits_B_V.shape[-1]:
        kth = torch.topk(logits_B_V, top_k, dim=-1).values[:, -1:]
        logits_B_V = logits_B_V.masked_fill(logits_B_V < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_B_V, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits_B_V = logits_B_V.masked_fill(drop, float("-inf"))
    return logits_B_V


def _inverse_cdf(logprobs_B_V: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval holds each row's uniform: a draw from ``softmax`` of the row.
    Scaled by the row's total so rounding never runs past the last token; a token of zero
    probability has an empty interval and is never drawn."""
    cdf_B_V = logprobs_B_V.double().exp().cumsum(dim=-1)
    total_B = cdf_B_V[:, -1]
    target_B = torch.minimum(uniform_B * total_B, torch.nextafter(total_B, torch.zeros_like(total_B)))
    return torch.searchsorted(cdf_B_V, target_B[:, None], right=True).squeeze(1)


def _cache_argument(model: Any) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; accept both generations."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    seeds: Sequence[int] = (),
) -> list[Generated]:
    """Sample one completion per prompt (left-padded batch), prompt ``b`` from ``seeds[b]``; stop
    each at EOS or max_new_tokens."""
    device = model.device
    B = len(prompts)
    if not greedy and len(seeds) != B:
        raise ValueError(f"sampling needs one seed per prompt: {B} prompts, {len(seeds)} seeds")
    # every uniform a prompt can use, drawn up front from its own generator (float64: the CDF is)
    uniforms_B_T = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(seed),
                                           dtype=torch.float64) for seed in seeds]) if not greedy else None
    P = max(len(p) for p in prompts)
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        input_ids[b, P - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention[b, P - len(prompt) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)

    was_training = model.training
    model.eval()
    tokens, sampling_lps, model_lps = [], [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long)
    cache_arg = _cache_argument(model)
    unfiltered = temperature == 1.0 and not 0 < top_k < model.config.vocab_size and top_p >= 1.0
    cache = None
    step_ids, step_positions = input_ids, positions
    try:
        for t in range(max_new_tokens):
            out = model(
                input_ids=step_ids,
                attention_mask=attention,
                position_ids=step_positions,
                use_cache=True,
                **{cache_arg: cache},
            )
            cache = getattr(out, cache_arg)
            logits = out.logits[:, -1].float()
            model_lp = torch.log_softmax(logits, dim=-1)
            if greedy:
                next_ids = logits.argmax(dim=-1)
                sampling_lp = model_lp
            else:
                # unfiltered at temperature 1 the behaviour policy is the model: the same tensor
                sampling_lp = model_lp if unfiltered else torch.log_softmax(
                    _filter(logits / temperature, top_k, top_p), dim=-1)
                next_ids = _inverse_cdf(sampling_lp, uniforms_B_T[:, t].to(device))
            next_ids = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
            tokens.append(next_ids)
            sampling_lps.append(sampling_lp.gather(1, next_ids[:, None]).squeeze(1))
            model_lps.append(model_lp.gather(1, next_ids[:, None]).squeeze(1))
            newly = ~done & (next_ids == eos_id)
            lengths[newly.cpu()] = t + 1
            done |= newly
            if bool(done.all()):
                break
            step_ids = next_ids[:, None]
            step_positions = step_positions[:, -1:] + 1
            attention = torch.cat([attention, torch.ones((B, 1), dtype=attention.dtype, device=device)], dim=1)
    finally:
        model.train(was_training)

    ids_B_T = torch.stack(tokens, dim=1).cpu()
    slp_B_T = torch.stack(sampling_lps, dim=1).cpu()
    mlp_B_T = torch.stack(model_lps, dim=1).cpu()
    done = done.cpu()
    return [
        Generated(
            ids_C=ids_B_T[b, : lengths[b]].clone(),
            sampling_logprobs_C=slp_B_T[b, : lengths[b]].clone(),
            model_logprobs_C=mlp_B_T[b, : lengths[b]].clone(),
            finished=bool(done[b]),
        )
        for b in range(B)
    ]


def special_ids(model: Any) -> tuple[int, int]:
    """(eos, pad) from a model's own configs, for callers without a tokenizer (pad falls back to eos)."""
    eos = model.generation_config.eos_token_id or model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    return eos, model.config.pad_token_id if model.config.pad_token_id is not None else eos


def greedy_complete(
    model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int, pad_id: int, batch_size: int
) -> list[list[int]]:
    """Greedy completion ids (no prompt), ``batch_size`` prompts at a time."""
    completions: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        outputs = generate(
            model,
            prompts[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            pad_id=pad_id,
            greedy=True,
        )
        completions.extend(out.ids_C.tolist() for out in outputs)
    return completions
