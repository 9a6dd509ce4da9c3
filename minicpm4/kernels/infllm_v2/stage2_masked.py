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
