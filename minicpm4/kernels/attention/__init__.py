"""Dense causal attention with GQA: one function, dispatched to a backend (spec §1.1).

Backends: "sdpa" (torch's fused scaled_dot_product_attention, the default) and "reference"
(`reference.eager_attention`, plain matmul + softmax, used by tests as the oracle).
Shape legend: B batch, N query heads, K kv heads, G = N // K, T queries, S keys, H head dim.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from minicpm4.kernels.attention.reference import eager_attention

BACKENDS = ("sdpa", "reference")


def attention(q_BNTH: torch.Tensor, k_BKSH: torch.Tensor, v_BKSH: torch.Tensor, *,
              mask_B1TS: torch.Tensor | None = None, is_causal: bool = False,
              backend: str | None = None) -> torch.Tensor:
    """Softmax attention, scale 1/sqrt(H); returns [B, N, T, H].

    `mask_B1TS` is boolean, True = may attend; `is_causal` applies the top-left causal mask
    (only meaningful when T == S). Selection: explicit `backend` > env MINICPM4_ATTN_BACKEND
    > "sdpa".
    """
    backend = backend or os.environ.get("MINICPM4_ATTN_BACKEND", "sdpa")
    if backend == "reference":
        return eager_attention(q_BNTH, k_BKSH, v_BKSH, mask_B1TS=mask_B1TS, is_causal=is_causal)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    B, N, T, H = q_BNTH.shape
    K = k_BKSH.shape[1]
    if T == 1 and mask_B1TS is None:
        # Decode: the G query heads of a group become G "query rows" of one kv head, so
        # the kernel reads each key once instead of expanding K/V G times.
        q_BKGH = q_BNTH.reshape(B, K, N // K, H)
        out_BKGH = F.scaled_dot_product_attention(q_BKGH, k_BKSH, v_BKSH)
        return out_BKGH.reshape(B, N, 1, H)
    return F.scaled_dot_product_attention(q_BNTH, k_BKSH, v_BKSH, attn_mask=mask_B1TS,
                                          is_causal=is_causal, enable_gqa=K != N)
