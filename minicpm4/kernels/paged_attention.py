"""Decode attention read straight from the engine's KV pages, bf16 CPU inference (issue 5).

`decode(q_BNH, k_pages, v_pages, table_BW, lens_B)`: for every row b, its query heads attend
over its `lens_B[b]` keys, key i sitting in page `table_BW[b, i // block_size]` at offset
`i % block_size` (`engine/kv_cache.BlockPool` layout `[blocks, block_size, K, H]`); GQA groups
of N // K query heads share a kv head; scale 1/sqrt(H); fp32 scores, softmax and sums; the
result bf16 [B, N, H]. `csrc/paged_attention.cpp` computes it without the gathered, padded
fp32 copies of the PyTorch path when it applies (CPU, bf16, no autograd, the extension built;
`MINICPM4_CPU_EXT=0` or `PAGED_DECODE = False` turn it off); `decode_reference` (gather +
softmax in fp32) otherwise, and as the tests' oracle.
Shape legend: B rows, N query heads, K kv heads, H head dim, W block-table width.
"""

from __future__ import annotations

import math

import torch

from minicpm4.kernels import cpu_ext

PAGED_DECODE = True
"""Module switch (tests and benchmarks compare with the gathered path)."""

_EXT = "paged_attention"


def applies(q_BNH: torch.Tensor, k_pages: torch.Tensor) -> bool:
    return PAGED_DECODE and q_BNH.dtype == torch.bfloat16 and \
        k_pages.dtype == torch.bfloat16 and cpu_ext.inference_op(_EXT, q_BNH, k_pages)


def decode_reference(q_BNH: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                     table_BW: torch.Tensor, lens_B: torch.Tensor) -> torch.Tensor:
    B, N, H = q_BNH.shape
    bs, K = k_pages.shape[1], k_pages.shape[2]
    out = torch.empty_like(q_BNH)
    for b in range(B):
        L = int(lens_B[b])
        i_L = torch.arange(L)
        slots_L = table_BW[b, i_L // bs] * bs + i_L % bs
        k_KLH = k_pages.view(-1, K, H)[slots_L].float().transpose(0, 1)
        v_KLH = v_pages.view(-1, K, H)[slots_L].float().transpose(0, 1)
        q_KGH = q_BNH[b].float().view(K, N // K, H)
        p_KGL = torch.softmax(q_KGH @ k_KLH.transpose(1, 2) / math.sqrt(H), dim=-1)
        out[b] = (p_KGL @ v_KLH).reshape(N, H).to(q_BNH.dtype)
    return out


def decode(q_BNH: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
           table_BW: torch.Tensor, lens_B: torch.Tensor) -> torch.Tensor:
    if applies(q_BNH, k_pages):
        return torch.ops.minicpm4_paged_attention.decode(q_BNH, k_pages, v_pages, table_BW,
                                                         lens_B)
    return decode_reference(q_BNH, k_pages, v_pages, table_BW, lens_B)
