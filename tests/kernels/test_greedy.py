"""Greedy token choice (kernels/greedy.py, csrc/greedy.cpp): the same indices as
`logits.float().max(-1).indices` for bf16 and fp32 rows, ties (first index), NaN and -inf rows,
one-column rows; bad input refused."""

from __future__ import annotations

import pytest
import torch

from minicpm4.kernels import cpu_ext, greedy


@pytest.fixture(scope="module")
def built() -> None:
    if not cpu_ext.load("greedy"):
        pytest.skip("the greedy C++ extension cannot be built here (or MINICPM4_CPU_EXT=0)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_torch_max(built, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 73448, generator=g).to(dtype)
    x[3, [10, 500, 70000]] = 50.0  # ties: the first index wins
    x[4] = float("-inf")
    x[5, 123] = float("nan")
    x[5, 9] = 99.0
    x[6, :] = 1.0
    x[7, 73447] = 80.0
    assert greedy.applies(x)
    got = greedy.argmax_rows(x)
    assert torch.equal(got, x.float().max(dim=-1).indices)
    assert got[3] == 10 and got[4] == 0 and got[5] == 123 and got[6] == 0 and got[7] == 73447
    one = torch.randn(4, 1).to(dtype)
    assert torch.equal(greedy.argmax_rows(one), torch.zeros(4, dtype=torch.long))


def test_refuses_bad_input_and_falls_back(built) -> None:
    op = torch.ops.minicpm4_greedy.argmax_rows
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        op(torch.randn(2, 5).double())
    with pytest.raises(RuntimeError, match=r"\[B, V\]"):
        op(torch.randn(5))
    x = torch.randn(3, 7, dtype=torch.float64)
    assert not greedy.applies(x)  # the reference answers
    assert torch.equal(greedy.argmax_rows(x), x.float().max(dim=-1).indices)
