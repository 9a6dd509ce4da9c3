"""Fused RoPE (kernels/fused_rotary.py, csrc/rotary.cpp): bit-identical to the reference
`model/layers.apply_rotary` for bf16 (odd shapes, long-context scaled cos / sin, strided x),
not taken wherever the kernel must not run, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

from minicpm4.kernels import cpu_ext, fused_rotary
from minicpm4.model.layers import apply_rotary


@pytest.fixture(scope="module")
def built() -> None:
    if not cpu_ext.load("rotary"):
        pytest.skip("the rotary C++ extension cannot be built here (or MINICPM4_CPU_EXT=0)")


def _cos_sin(B: int, T: int, H: int, scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 70_000, (B, T), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, H, 2).float() / H))
    freqs = pos[..., None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def _reference(x_BTNH, cos, sin):
    return apply_rotary(x_BTNH.transpose(1, 2), cos, sin).transpose(1, 2)


@pytest.mark.parametrize("shape", [(1, 1, 8, 128), (4, 1, 2, 64), (2, 37, 3, 16), (1, 300, 16, 64)])
def test_bit_identical_to_reference(built, shape) -> None:
    B, T, N, H = shape
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    cos, sin = _cos_sin(B, T, H, scale=1.19)
    with torch.no_grad():
        assert fused_rotary.applies(x, cos)
        assert torch.equal(fused_rotary.rotary(x, cos, sin), _reference(x, cos, sin))


def test_strided_input(built) -> None:
    qkv = torch.randn(2, 5, 6, 32).bfloat16()
    x = qkv[:, :, 1:5]  # heads 1..4 of a fused projection: not contiguous
    cos, sin = _cos_sin(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(fused_rotary.rotary(x, cos, sin), _reference(x, cos, sin))


def test_not_taken_where_the_kernel_must_not_run(built, monkeypatch) -> None:
    cos, _ = _cos_sin(1, 3, 16)
    assert not fused_rotary.applies(torch.randn(1, 3, 2, 16), cos)  # fp32: the reference
    x = torch.randn(1, 3, 2, 16).bfloat16().requires_grad_()
    assert not fused_rotary.applies(x, cos)  # autograd: the reference
    assert not fused_rotary.applies(x.detach(), cos.double())
    monkeypatch.setattr(fused_rotary, "FUSED_ROTARY", False)
    assert not fused_rotary.applies(x.detach(), cos)


def test_op_refuses_bad_input(built) -> None:
    op = torch.ops.minicpm4_rotary.rotary
    cos, sin = _cos_sin(1, 3, 16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        op(torch.randn(1, 3, 2, 16), cos, sin)
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.randn(1, 3, 2, 16).bfloat16(), cos.double(), sin.double())
    with pytest.raises(RuntimeError, match=r"\[B, T, H\]"):
        op(torch.randn(1, 3, 2, 8).bfloat16(), cos, sin)
