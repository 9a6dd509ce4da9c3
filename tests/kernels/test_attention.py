"""Dense attention dispatch (kernels/attention): SDPA paths against the eager reference,
including the grouped decode path with a padding mask and the fp32 route for CPU bf16."""

from __future__ import annotations

import pytest
import torch

from minicpm4.kernels.attention import attention
from minicpm4.kernels.attention.reference import eager_attention


def _qkv(B, N, K, T, S, H, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, T, H, generator=g).to(dtype),
            torch.randn(B, K, S, H, generator=g).to(dtype),
            torch.randn(B, K, S, H, generator=g).to(dtype))


@pytest.mark.parametrize("T,S", [(1, 37), (5, 37), (37, 37)])
def test_sdpa_matches_reference_with_padding_mask(T, S) -> None:
    q, k, v = _qkv(3, 8, 2, T, S, 16)
    mask = torch.ones(3, 1, T, S, dtype=torch.bool)
    mask[1, ..., :9] = False  # left padding of row 1
    diag_TS = torch.arange(S).view(1, -1) == (torch.arange(T) + S - T).view(-1, 1)
    mask &= torch.arange(S).view(1, -1) <= (torch.arange(T) + S - T).view(-1, 1)
    mask |= diag_TS  # as the model does: a padding query attends to itself, never to nothing
    torch.testing.assert_close(attention(q, k, v, mask_B1TS=mask),
                               eager_attention(q, k, v, mask_B1TS=mask), rtol=1e-5, atol=1e-5)


def test_bf16_on_cpu_is_computed_in_fp32() -> None:
    q, k, v = _qkv(2, 4, 2, 1, 50, 32, dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    mask[0, ..., :7] = False
    out = attention(q, k, v, mask_B1TS=mask)
    assert out.dtype == torch.bfloat16
    want = eager_attention(q.float(), k.float(), v.float(), mask_B1TS=mask).bfloat16()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
