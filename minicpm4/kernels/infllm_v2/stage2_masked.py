"""InfLLM v2 stage 2 as one masked SDPA call: the training path on CPU (spec §2.2 step 6, §2.3).

The selected blocks (and causality) become a dense boolean [N, T, S] mask and PyTorch's
`scaled_dot_product_attention` (fused CPU kernel, its own backward) attends with it. The result
is the same attention as the "gather" backend (every query sees exactly its selected keys), but
the cost is that of dense attention: nothing is saved, and the mask takes N*T*S bytes, so this
is for training rows of a few thousand tokens, where gather's backward is ~5x slower than a
fused masked kernel on this CPU (see `sparse_attention`). A query whose mask row is empty
(impossible with InfLLM v2's forced local block, tolerated for arbitrary indices) outputs 0.
Shape legend: N query heads, K kv heads, T queries, S keys, H head dim, k slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minicpm4.kernels import needs_grad


def masked_one(q_NTH: torch.Tensor, k_KSH: torch.Tensor, v_KSH: torch.Tensor,
               mask_KTS: torch.Tensor) -> torch.Tensor:
    """Attention of one sequence under a boolean [K, T, S] mask shared by each KV group."""
    N, K = q_NTH.shape[0], k_KSH.shape[0]
    empty_KT1 = ~mask_KTS.any(dim=-1, keepdim=True)
    if bool(empty_KT1.any()):
        mask_KTS = mask_KTS | empty_KT1  # any finite row; zeroed below
    mask_NTS = mask_KTS.repeat_interleave(N // K, dim=0)
    out_NTH = F.scaled_dot_product_attention(q_NTH[None], k_KSH[None].to(q_NTH.dtype),
                                             v_KSH[None].to(q_NTH.dtype),
                                             attn_mask=mask_NTS[None], enable_gqa=N != K)[0]
    if bool(empty_KT1.any()):
        out_NTH = out_NTH.masked_fill(empty_KT1.repeat_interleave(N // K, dim=0), 0.0)
    return out_NTH


MASKED_MAX_SCORES = 1 << 26
"""`sparse_attention` "auto" uses this path for a CPU backward with T*S up to this (8K x 8K).
Demo model, 2048 tokens, bf16: gather forward 2.6 s + backward 7.5 s of a 16.3 s step; one
layer at 4096 tokens (4/2 heads, head dim 64): gather 5.1 s fwd+bwd, masked 2.2 s."""


def masked_training(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return needs_grad(q, k, v) and q.device.type == "cpu" and \
        q.shape[-2] * k.shape[-2] <= MASKED_MAX_SCORES
