"""Inference-time bf16 linear layers for few rows on CPU (decode steps): the skinny GEMM kernel.

Issue 5, acceptance item 5 (`benchmarks/serve.py`: decode throughput >= 2x transformers'
batched `generate` at equal batch). A decode step multiplies M = batch (1..32) rows by every
weight matrix once, so it is bound by how fast the bf16 weights stream from memory, and on
this project's AVX-512 EPYC machines torch's bf16 GEMM for so few rows streams them slowly:
measured (2 threads), a 1 x 4096 @ 4096 x 4096 bf16 GEMV 8.4 ms (~4 GB/s of weights), the
same in fp32 4.25 ms (~16 GB/s); at M = 8 bf16 `F.linear` reaches ~8.7 GB/s.
`csrc/skinny_gemm.cpp` computes x @ W^T straight from the nn.Linear weight ([N, K], no
repacked copy) with AVX-512 BF16 dot products and fp32 accumulation, split over N between
torch's threads. Measured against bf16 `F.linear` (`benchmarks/skinny_linear.py`, 2 threads,
weights cold, the 10 linear shapes of the 0.5B and demo models; record in
`benchmarks/results/2026-11_cpu-2core_skinny_linear.md`): 1.83x faster at M = 1, 1.76x at
M = 8, 1.44x at M = 32 (geometric means), streaming 21-33 GB/s of weights at M <= 8 on the
large matrices where F.linear streams 9-20 GB/s. Where the CPU has AMX-BF16 the kernel runs
on the tile unit (`csrc/skinny_gemm_amx.h`; docs/kernels.md): on a 2-vCPU Xeon, 1.9-2.2x
F.linear at M = 8 and 1.4x at M = 32, where the vector path alone is 0.52x
(`benchmarks/results/2026-12_cpu-2core-amx_skinny_linear.md`).

`linear(x, weight, bias)` has `F.linear`'s semantics for any leading dims. It takes the
kernel only when everything below holds, and is `F.linear` otherwise:
- CPU tensors, x, weight (and bias) bfloat16, weight contiguous (other weight types, e.g.
  quantised ones, never get here: they are not bf16 tensors);
- no autograd: grad mode off or nothing requires grad (training keeps its paths,
  `kernels/matmul.py`);
- at most `max_rows()` rows (x.numel() / K): 32, or 160 where the AMX tile path runs (K % 32
  == 0 and N >= 32); larger prefill chunks keep torch's GEMM, compute-bound there and faster;
- the extension built (`cpu_ext.load("skinny_gemm")`, once, ~15 s) and not disabled
  (`MINICPM4_CPU_EXT=0`, also read at call time, or `SKINNY_LINEAR = False` here).
The result is bf16 like `F.linear`'s; sums are fp32 and rounded once, so values differ from
torch's only in summation order.
Shape legend: M rows, K inner, N output features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minicpm4.kernels import cpu_ext, needs_grad

SKINNY_LINEAR = True
"""Module switch (tests and benchmarks turn it off to compare with `F.linear`)."""

MAX_ROWS = 32
"""Cut-over of the AVX-512 vector path: more rows than this go to `F.linear`. At 32 rows the
kernel is still 1.44x faster (geometric mean; 1.00x on the 0.5B down_proj, K = 4096) on the
AVX-512 EPYC (`benchmarks/skinny_linear.py`)."""

MAX_ROWS_AMX = 160
"""Cut-over where the AMX tile path runs (`max_rows`): rows beyond 32 go through the tiles in
passes of 32, the weights read from memory by the first pass and from L2 by the others.
What the engine would run instead is `kernels/matmul.bucketed_linear` (oneDNN on rows padded
to a bucket), so that is the comparison (`benchmarks/skinny_linear.py --rows 120,160,176
--bucketed`, weights from memory, 2-vCPU AMX Xeon): bucketed / tiles 1.13-2.05x at 120 rows
and 1.01-1.61x at 160 on every layer shape of the 0.5B and demo models, 0.98-2.10x at 176
(0.5B down and q/o slower on the tiles there); the LM heads, which never see that many rows
in the engine, 0.87-1.36x;
against oneDNN at a constant row count (a primitive cached for it, which varying prefill
chunks do not get) the tile path is 1.32x / 1.13x / 1.04x at 64 / 96 / 128 rows (geometric
mean, `benchmarks/skinny_linear.py --rows 64,96,128`). Those GEMMs are a small part of an
engine run: `benchmarks/engine_switches.py --switch rows160 --fresh` (160 vs 96) gave 0.989x
/ 1.009x on the demo at C = 8 / 1, 1.005x on the 0.5B-shaped model at C = 32, and a
throwaway A/B in a slower phase of the VM 1.085x / 1.007x / 1.037x
(`benchmarks/results/2026-12_cpu-2core-amx_engine_switches.md`)."""

_EXT = "skinny_gemm"
_has_amx: bool | None = None  # the op's answer, asked once


def max_rows() -> int:
    """The most rows the kernel takes on this CPU: `MAX_ROWS_AMX` where the AMX tile path
    runs, `MAX_ROWS` otherwise (and when the kernel is not available)."""
    global _has_amx
    if not available():
        return MAX_ROWS
    if _has_amx is None:
        _has_amx = bool(torch.ops.minicpm4_skinny_gemm.has_amx())
    return MAX_ROWS_AMX if _has_amx else MAX_ROWS


def available() -> bool:
    """True when the C++ op is built and loaded and the kernel is switched on."""
    if not (SKINNY_LINEAR and cpu_ext.enabled()):
        return False
    return cpu_ext.load(_EXT)


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear(x, weight, bias)` takes the C++ kernel (module docstring)."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dim() == 0:
        return False
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.device.type != "cpu"):
        return False
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or not weight.is_contiguous():
        return False  # tensor subclasses (quantised / DTensor weights) keep their own linear
    if needs_grad(x, weight, bias):
        return False
    K = x.shape[-1]
    if K != weight.shape[1] or K == 0:
        return False
    rows = x.numel() // K
    if rows > MAX_ROWS and (K % 32 or weight.shape[0] < 32 or rows > max_rows()):
        return False  # more than 32 rows only on the tile path, up to `max_rows()`
    return available()


def kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """The C++ op on any leading dims, without the checks of `applies` (call that first)."""
    x_MK = x.reshape(-1, x.shape[-1])
    y_MN = torch.ops.minicpm4_skinny_gemm.linear(x_MK, weight, bias)
    return y_MN.view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; bf16 inference with few rows on CPU via the C++ kernel."""
    if applies(x, weight, bias):
        return kernel(x, weight, bias)
    return F.linear(x, weight, bias)
