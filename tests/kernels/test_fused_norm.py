"""Fused RMSNorm / residual-add + RMSNorm (kernels/fused_norm.py, csrc/rms_norm.cpp): equal to
the PyTorch reference (`model/layers.RMSNorm`, bf16 tensor ops) up to rare neighbouring bf16
roundings of the normed values, the residual sum exactly; the reference wherever the kernel
must not run; a bf16 model decodes the same tokens with and without it."""

from __future__ import annotations

import pytest
import torch

from minicpm4.kernels import cpu_ext, fused_norm
from minicpm4.model.layers import RMSNorm


@pytest.fixture(scope="module")
def built() -> None:
    if not cpu_ext.load("rms_norm"):
        pytest.skip("the rms_norm C++ extension cannot be built here (or MINICPM4_CPU_EXT=0)")


def _norm(D: int, seed: int = 0) -> RMSNorm:
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(D, eps=1e-6)
    norm.weight.data = (1 + 0.5 * torch.randn(D, generator=g)).bfloat16()
    return norm


def _assert_close_bf16(y: torch.Tensor, ref: torch.Tensor) -> None:
    """The normed value x * rstd may round to the neighbouring bf16 value (the kernel's fp32
    sum of squares runs in another order); times the weight (|w| < 4 here) and rounded
    again, the result then differs by a few ulps of bf16 (2^-8 relative each)."""
    assert y.dtype == ref.dtype == torch.bfloat16 and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref.float(), rtol=2.0 ** -6, atol=1e-6)
    assert (y != ref).float().mean().item() < 0.01  # differences are rare ties


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("shape", [(1, 256), (8, 1, 1024), (3, 5, 96), (2048, 256), (7, 33)])
def test_rms_norm_matches_reference(built, shape) -> None:
    norm = _norm(shape[-1])
    x = (torch.randn(*shape) * 4).bfloat16()
    with torch.no_grad():
        assert fused_norm.applies(x, norm.weight)
        _assert_close_bf16(fused_norm.rms_norm(x, norm), norm(x))


@pytest.mark.parametrize("shape", [(1, 256), (8, 1, 1024), (2048, 96)])
def test_add_rms_norm_matches_reference(built, shape) -> None:
    norm = _norm(shape[-1], seed=1)
    x, r = (torch.randn(*shape) * 4).bfloat16(), torch.randn(*shape).bfloat16()
    scale = 1.4 / 24 ** 0.5
    with torch.no_grad():
        x_new, y = fused_norm.add_rms_norm(x, r, scale, norm)
        ref_x = x + r * scale
        assert torch.equal(x_new, ref_x)
        _assert_close_bf16(y, norm(ref_x))


def test_non_contiguous_input(built) -> None:
    norm = _norm(64)
    x = torch.randn(64, 10).bfloat16().t()  # [10, 64], strided
    with torch.no_grad():
        _assert_close_bf16(fused_norm.rms_norm(x, norm), norm(x.contiguous()))


def test_reference_where_the_kernel_must_not_run(built) -> None:
    norm = _norm(32)
    x32 = torch.randn(4, 32)
    norm32 = RMSNorm(32)
    assert not fused_norm.applies(x32, norm32.weight)  # fp32 keeps the reference
    assert torch.equal(fused_norm.rms_norm(x32, norm32), norm32(x32))
    x = torch.randn(4, 32).bfloat16().requires_grad_()
    assert not fused_norm.applies(x, norm.weight)  # autograd keeps the reference
    fused_norm.add_rms_norm(x, x, 0.5, norm)[1].float().sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad.float()).all())


def test_ops_refuse_bad_input(built) -> None:
    ops = torch.ops.minicpm4_rms_norm
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.randn(2, 8).bfloat16(), torch.ones(9).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="residual"):
        ops.add_rms_norm(torch.randn(2, 8).bfloat16(), torch.randn(3, 8).bfloat16(), 1.0,
                         torch.ones(8).bfloat16(), 1e-6)


@torch.no_grad()
def test_bf16_model_decodes_the_same_with_and_without(built, monkeypatch,
                                                     tiny_bf16_model) -> None:
    model = tiny_bf16_model
    ids = torch.randint(3, 512, (2, 12))

    def greedy() -> tuple[torch.Tensor, list[list[int]]]:
        from minicpm4.model.cache import StaticKVCache
        cfg = model.config
        cache = StaticKVCache(num_layers=cfg.num_hidden_layers, batch_size=2, max_len=40,
                              num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim_,
                              dtype=torch.bfloat16)
        logits = model(ids, cache=cache, logits_to_keep=1)[:, -1]
        first, out = logits, [[], []]
        for _ in range(16):
            nxt = logits.argmax(-1)
            for b in range(2):
                out[b].append(int(nxt[b]))
            logits = model(nxt.view(2, 1), cache=cache)[:, -1]
        return first, out

    fused_logits, fused_ids = greedy()
    monkeypatch.setattr(fused_norm, "FUSED_NORM", False)
    ref_logits, ref_ids = greedy()
    torch.testing.assert_close(fused_logits, ref_logits, rtol=0.05, atol=0.05)
    assert fused_ids == ref_ids
