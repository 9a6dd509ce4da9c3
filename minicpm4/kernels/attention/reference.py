"""Pure-PyTorch softmax attention with GQA: the oracle the fast attention paths are tested against.

Shape legend: B batch, N query heads, K kv heads, T queries, S keys, H head dim.
"""

from __future__ import annotations

import math

import torch


def eager_attention(q_BNTH: torch.Tensor, k_BKSH: torch.Tensor, v_BKSH: torch.Tensor, *,
                    mask_B1TS: torch.Tensor | None = None,
                    is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(H) + mask) v, computed in fp32, returned in q's dtype."""
    group = q_BNTH.shape[1] // k_BKSH.shape[1]
    k_BNSH = k_BKSH.repeat_interleave(group, dim=1).float()
    v_BNSH = v_BKSH.repeat_interleave(group, dim=1).float()
    scores_BNTS = q_BNTH.float() @ k_BNSH.transpose(-1, -2) / math.sqrt(q_BNTH.shape[-1])
    T, S = scores_BNTS.shape[-2:]
    if is_causal:
        causal_TS = torch.ones(T, S, dtype=torch.bool, device=q_BNTH.device).tril()
        scores_BNTS = scores_BNTS.masked_fill(~causal_TS, float("-inf"))
    if mask_B1TS is not None:
        scores_BNTS = scores_BNTS.masked_fill(~mask_B1TS, float("-inf"))
    return (scores_BNTS.softmax(dim=-1) @ v_BNSH).to(q_BNTH.dtype)
