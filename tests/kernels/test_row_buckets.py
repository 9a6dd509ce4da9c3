"""Row bucketing of bf16 CPU inference GEMMs (`kernels/matmul.bucket_rows`, `bucketed_linear`):
the bucket sizes, the result against `F.linear`, and which calls take it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minicpm4.kernels import matmul, skinny_linear


def test_bucket_sizes() -> None:
    sizes = set()
    for m in range(1, 5000):
        b = matmul.bucket_rows(m)
        assert b >= m and b % 32 == 0
        if m > 256:
            assert b <= m * 9 / 8, (m, b)  # at most 1/8 more rows
        if 1024 < m <= 2048:
            sizes.add(b)
    assert len(sizes) <= 9  # a handful of shapes per doubling, so they stay cached


@pytest.mark.parametrize("m", [33, 100, 257, 901])
def test_bucketed_linear_matches_f_linear(m) -> None:
    torch.manual_seed(m)
    x = torch.randn(1, m, 96).bfloat16()
    w = torch.randn(80, 96).bfloat16()
    b = torch.randn(80).bfloat16()
    y = matmul.bucketed_linear(x, w, b)
    ref = F.linear(x.float(), w.float(), b.float())
    assert y.shape == (1, m, 80) and y.dtype == torch.bfloat16 and y.is_contiguous()
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)


def test_apply_linear_takes_it_only_for_bf16_cpu_inference_prefill(monkeypatch) -> None:
    taken = []
    real = matmul.bucketed_linear
    monkeypatch.setattr(matmul, "bucketed_linear", lambda *a: taken.append(a[0].shape) or real(*a))
    lin = nn.Linear(64, 48, bias=False)
    rows = skinny_linear.max_rows() + 7
    with torch.no_grad():
        matmul.apply_linear(lin, torch.randn(rows, 64))  # fp32: torch's own path
        assert not taken
        lin_bf = lin.bfloat16()
        matmul.apply_linear(lin_bf, torch.randn(rows, 64).bfloat16())
        assert taken == [(rows, 64)]
        monkeypatch.setattr(matmul, "ROW_BUCKETS", False)
        matmul.apply_linear(lin_bf, torch.randn(rows, 64).bfloat16())
        assert len(taken) == 1
    monkeypatch.setattr(matmul, "ROW_BUCKETS", True)
    matmul.apply_linear(lin_bf, torch.randn(rows, 64).bfloat16())  # autograd on: not taken
    assert len(taken) == 1
