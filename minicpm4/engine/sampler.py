"""Turn a batch of logits into next tokens, each row under its own `SamplingParams`.

Order (as vLLM): repetition / presence / frequency penalties, then greedy rows take the argmax;
the others apply temperature, top-k, top-p and min-p, then draw from their own generator.
Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

import torch

from minicpm4.engine.request import SamplingParams


def token_counts(token_lists: list[list[int]], vocab_size: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, V] float counts of each token id per row."""
    counts_BV = torch.zeros(len(token_lists), vocab_size, device=device)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids = torch.tensor(tokens, device=device)
            counts_BV[row].index_add_(0, ids, torch.ones(len(tokens), device=device))
    return counts_BV


def apply_penalties(logits_BV: torch.Tensor, params: list[SamplingParams], *,
                    prompt_counts_BV: torch.Tensor | None,
                    output_counts_BV: torch.Tensor | None) -> torch.Tensor:
    """Repetition penalty over prompt+output tokens; presence/frequency over output tokens."""
    rep = [p.repetition_penalty for p in params]
    pres = [p.presence_penalty for p in params]
    freq = [p.frequency_penalty for p in params]
    dev = logits_BV.device
    if any(r != 1.0 for r in rep) and (prompt_counts_BV is not None or
                                       output_counts_BV is not None):
        seen_BV = torch.zeros_like(logits_BV, dtype=torch.bool)
        for counts in (prompt_counts_BV, output_counts_BV):
            if counts is not None:
                seen_BV |= counts > 0
        rep_B1 = torch.tensor(rep, device=dev).view(-1, 1)
        penalized = torch.where(logits_BV > 0, logits_BV / rep_B1, logits_BV * rep_B1)
        logits_BV = torch.where(seen_BV, penalized, logits_BV)
    if output_counts_BV is not None and (any(pres) or any(freq)):
        freq_B1 = torch.tensor(freq, device=dev).view(-1, 1)
        pres_B1 = torch.tensor(pres, device=dev).view(-1, 1)
        logits_BV = logits_BV - freq_B1 * output_counts_BV \
            - pres_B1 * (output_counts_BV > 0).float()
    return logits_BV


def filter_logits(logits_BV: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masking (masked logits become -inf)."""
    dev = logits_BV.device
    temps_B1 = torch.tensor([p.temperature or 1.0 for p in params], device=dev).view(-1, 1)
    logits_BV = logits_BV / temps_B1
    vocab = logits_BV.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_k):
        k_B1 = torch.tensor(top_k, device=dev).view(-1, 1)
        kth_B1 = logits_BV.sort(dim=-1, descending=True).values.gather(1, k_B1 - 1)
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        before_BV = probs_BV.cumsum(dim=-1) - probs_BV
        top_p_B1 = torch.tensor([p.top_p for p in params], device=dev).view(-1, 1)
        drop_BV = before_BV >= top_p_B1
        drop_BV[:, 0] = False
        logits_BV = logits_BV.masked_fill(
            torch.zeros_like(drop_BV).scatter(1, order_BV, drop_BV), float("-inf"))
    if any(p.min_p > 0.0 for p in params):
        probs_BV = logits_BV.softmax(dim=-1)
        min_p_B1 = torch.tensor([p.min_p for p in params], device=dev).view(-1, 1)
        limit_B1 = probs_BV.amax(dim=-1, keepdim=True) * min_p_B1
        logits_BV = logits_BV.masked_fill(probs_BV < limit_B1, float("-inf"))
    return logits_BV


def sample(logits_BV: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None], *,
           prompt_counts_BV: torch.Tensor | None = None,
           output_counts_BV: torch.Tensor | None = None) -> torch.Tensor:
    """Next token id per row, [B] long. `generators[i]` is None for the global RNG."""
    if len(params) != logits_BV.shape[0] or len(generators) != logits_BV.shape[0]:
        raise ValueError("one SamplingParams and one generator per row are required")
    logits_BV = apply_penalties(logits_BV.float(), params, prompt_counts_BV=prompt_counts_BV,
                                output_counts_BV=output_counts_BV)
    # max(dim).indices: argmax's answer (the first maximum), ~2.5x faster on CPU at V = 73K
    tokens_B = logits_BV.max(dim=-1).indices
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits_BV.device)
        sub_params = [params[i] for i in random_rows]
        probs_RV = filter_logits(logits_BV.index_select(0, rows), sub_params).softmax(dim=-1)
        for j, i in enumerate(random_rows):
            tokens_B[i] = torch.multinomial(probs_RV[j], 1, generator=generators[i])[0]
    return tokens_B
