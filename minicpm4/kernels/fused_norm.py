"""Fused RMSNorm and residual-add + RMSNorm for bf16 CPU inference (issue 5: decode overhead).

`rms_norm(x, norm)` is `norm(x)` (`model/layers.RMSNorm`) and `add_rms_norm(x, r, scale,
norm)` is `(x + r * scale, norm(x + r * scale))`; each runs as one op of `csrc/rms_norm.cpp`
when it applies (below), else as the PyTorch reference, which is also the definition:
    x32 = x.float(); y = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)
with the residual `x + r * scale` rounded to bf16 twice, as bf16 tensor ops round it.
A decode step of a small model is mostly op dispatch; this removes ~14 of the ~40 ops of a
layer. The kernel sums in fp32 in its own order, so a normed value may round to the bf16
neighbour of the reference's; tests/kernels/test_fused_norm.py bounds that.
It applies when: CPU, x / r / weight bfloat16, no autograd, the `rms_norm` extension built
(`MINICPM4_CPU_EXT=0` or `FUSED_NORM = False` turn it off). fp32 and training keep the
reference (the model's training RMSNorm has its own backward).
"""

from __future__ import annotations

import torch

from minicpm4.kernels import cpu_ext

FUSED_NORM = True
"""Module switch (tests and benchmarks compare with the reference)."""

_EXT = "rms_norm"


def applies(x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor | None = None) -> bool:
    if not FUSED_NORM or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    if r is not None and (r.dtype != torch.bfloat16 or r.shape != x.shape):
        return False
    return cpu_ext.inference_op(_EXT, x, weight, r)


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """`norm(x)` for an `RMSNorm` module (`weight`, `variance_epsilon`)."""
    if applies(x, norm.weight):
        return torch.ops.minicpm4_rms_norm.rms_norm(x, norm.weight, norm.variance_epsilon)
    return norm(x)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, scale: float, norm: torch.nn.Module
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x + r * scale, norm(x + r * scale))`."""
    if applies(x, norm.weight, r):
        return torch.ops.minicpm4_rms_norm.add_rms_norm(x, r, scale, norm.weight,
                                                        norm.variance_epsilon)
    x = x + r * scale
    return x, norm(x)
