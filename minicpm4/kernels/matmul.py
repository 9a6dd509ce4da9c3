"""Training matmuls on CPU: x @ W^T through oneDNN, and the switch for the training kernels.

`apply_linear` is also the inference entry of the model's linear layers: bf16 decode-sized
inputs on CPU go to the skinny GEMM kernel (`kernels/skinny_linear.py`); larger bf16 CPU
inference inputs (prefill) have their rows padded up to a bucket (`bucket_rows`) before torch's
GEMM. torch's bf16 CPU GEMM (oneDNN) builds a kernel per new shape: measured on the 2-vCPU AMX
Xeon, [M, 256] @ [256, 640] with M drawn from 40-300 at every call 555 us per call, the same
with M rounded up to a multiple of 64 77 us, a fixed M = 300 91 us. An engine step's token
count changes with every step (new prompts of any length join), so unpadded nearly every
prefill GEMM pays that build; padded, a few sizes per doubling recur and stay cached.

Spec §5 (training system); the custom autograd paths of `model/layers.py` and the fused
LM-head loss (`kernels/linear_ce.py`) are all gated by `needs_training_kernels`. The plain
reference for everything here is `F.linear` (tests/kernels/test_training_kernels.py).
Shape legend: M rows, K inner, N output features.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from minicpm4.kernels import needs_grad, skinny_linear

ROW_BUCKETS = True
"""Module switch: pad bf16 CPU inference GEMMs' rows up to `bucket_rows` (module docstring)."""

TRAINING_KERNELS = os.environ.get("MINICPM4_TRAINING_KERNELS", "1") != "0"
"""Use the fused training path (module docstring) when gradients are needed."""


def needs_training_kernels(*tensors: torch.Tensor) -> bool:
    """True when autograd will differentiate through an op on `tensors` (and the fused
    training path is on)."""
    return TRAINING_KERNELS and needs_grad(*tensors)


_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) \
    if torch.backends.mkldnn.is_available() else None


def matmul_nt(a_MK: torch.Tensor, b_NK: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D tensors; fp32 on CPU goes through oneDNN rather than MKL sgemm.

    Same fp32 math (different summation order). torch sends fp32 matmuls to MKL sgemm; on
    this project's AMD EPYC (AVX-512) VMs oneDNN is 1.1-1.4x faster for the training shapes
    (measured, 2 threads, M = 2048 tokens: x @ W^T for W [3072, 512] 46.5 -> 32.7 ms, g @ W
    44.1 -> 32.5 ms; the 73448-row LM head 1.17 -> 1.07 s and 1.20 -> 0.89 s), not for the
    weight gradient g^T @ x (about equal, so that one stays on MKL). `b` may be strided
    (e.g. `w.t()`: oneDNN reorders it itself, faster than a `.contiguous()` copy).
    """
    if _ONEDNN_LINEAR is not None and a_MK.device.type == "cpu" and \
            a_MK.dtype == torch.float32 and b_NK.dtype == torch.float32:
        return _ONEDNN_LINEAR(a_MK.contiguous(), b_NK, None, "none", [], "")
    return a_MK @ b_NK.t()


class _LinearFunction(torch.autograd.Function):
    """F.linear(x, w) (no bias) with the forward and input-gradient matmuls by `matmul_nt`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x_MK = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x_MK, weight)
        ctx.x_shape = x.shape
        return matmul_nt(x_MK, weight).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_MK, weight = ctx.saved_tensors
        g_MN = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_nt(g_MN, weight.t()).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # g^T x: oneDNN is no faster than MKL here (measured)
            grad_w = g_MN.t() @ x_MK
        return grad_x, grad_w


def _onednn_training(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return _ONEDNN_LINEAR is not None and x.device.type == "cpu" and \
        x.dtype == torch.float32 and weight.dtype == torch.float32 and \
        not torch.is_autocast_enabled("cpu") and needs_training_kernels(x, weight)


def train_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)`; in fp32 training on CPU (no autocast) through `matmul_nt`."""
    if _onednn_training(x, weight):
        return _LinearFunction.apply(x, weight)
    return F.linear(x, weight)


def apply_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)`; in fp32 training on CPU (no autocast) through `matmul_nt` instead, and
    in bf16 inference with few rows on CPU (decode) through the skinny GEMM kernel
    (`kernels/skinny_linear.py`); on those two paths the module's hooks are not called."""
    if linear.bias is None and _onednn_training(x, linear.weight):
        return _LinearFunction.apply(x, linear.weight)
    if type(linear) is nn.Linear and skinny_linear.applies(x, linear.weight, linear.bias):
        return skinny_linear.kernel(x, linear.weight, linear.bias)
    if type(linear) is nn.Linear and _row_bucketed(x, linear.weight, linear.bias):
        return bucketed_linear(x, linear.weight, linear.bias)
    return linear(x)


def bucket_rows(m: int) -> int:
    """m rounded up to a multiple of max(32, 2^(bit_length(m) - 4)): at most 1/8 more rows
    (beyond 256), about 8 distinct sizes per doubling."""
    step = max(32, 1 << max(0, m.bit_length() - 4))
    return -(-m // step) * step


def _row_bucketed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """For `apply_linear`, after the skinny kernel did not take x."""
    if not ROW_BUCKETS or x.device.type != "cpu" or x.dtype != torch.bfloat16 \
            or weight.dtype != torch.bfloat16 or x.dim() == 0 or x.shape[-1] == 0:
        return False
    if type(weight) not in (torch.Tensor, nn.Parameter) or needs_grad(x, weight, bias):
        return False
    return x.numel() // x.shape[-1] > skinny_linear.MAX_ROWS


def bucketed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with x's rows zero-padded to `bucket_rows` (the padding's
    outputs are dropped; the real rows' are a prefix of the result, so no copy)."""
    x_MK = x.reshape(-1, x.shape[-1])
    M = x_MK.shape[0]
    pad = bucket_rows(M) - M
    if pad:
        x_MK = F.pad(x_MK, (0, 0, 0, pad))
    return F.linear(x_MK, weight, bias)[:M].view(*x.shape[:-1], weight.shape[0])
