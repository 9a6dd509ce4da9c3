"""InfLLM v2 stage 2 through the fused C++ CPU kernel (spec §2.2 step 6, §2.4; issue 4).

`csrc/sparse_attn.cpp` (built on first use by `kernels/cpu_ext.py`) computes, per KV head
and group of R query rows, only the keys each row selected: all G heads of a row share its
blocks (the M dimension of the products, as in the CUDA kernel of §2.2), either row by row
against 64-key chunks in AVX-512 register tiles or packed per block into MKL sgemms
(`AVX512`), and a per-row online softmax streams the blocks, so no union of selections is
scored and no K/V is copied. Consecutive blocks picked by the same rows
(the sink and the local window, for every row) run as one wider product. Forward only, fp32
math; bf16 inputs are read as bf16 and converted block by block. The oracle is
`stage2.sparse_attention_reference` (tests/kernels/test_infllm_v2_cpp.py); `stage2.sparse_attention` takes this path for CPU
inference whenever the kernel is available.
Shape legend: N query heads, K kv heads, T queries, S keys, H head dim, k slots.
"""

from __future__ import annotations

import math

import torch

from minicpm4.kernels import cpu_ext, needs_grad

ROWS = 128
"""Query rows per work item (at most 256). More rows reuse each loaded key block for more
queries (a bigger M per sgemm); fewer rows give more, smaller work items. Stage 2 alone, 2
threads, N=16/K=1/H=128, selections from random q/k: 64K took 21.8 / 20.8 / 22.7 s with
64 / 128 / 256 rows; 32K 10.2 s with 64 rows, 11.8 s with 16; 16K 4.3 / 4.6 / 6.2 s with
64 / 16 / 4 rows. The 64K figures are from the probe `benchmarks/sparse_stage2_rows.py`; the
32K/16K ones from an earlier ad-hoc version of it that selected with the PyTorch path. All
of these are the MKL path; on the AVX-512 path the count matters little (an ad-hoc probe over
the last 4,096 queries of 64K: 1.30-1.36 s for 32, 64, 128 and 256 rows)."""
AVX512 = True
"""Take the register-tiled AVX-512 inner loops (`csrc/sparse_attn_avx512.h`: each selecting
row against 64-key chunks, no per-run packing) where the build has AVX-512 and the head dim is
16, 32, 64, 128 or 256; False: the MKL path (rows packed per run into sgemms) everywhere.
Tests run both."""
MAX_KEY_FLOATS = 1 << 18
"""Score tile budget: a run of blocks is cut so that M x L fp32 scores stay within 1 MiB,
at least one block (256 KiB measured 2-3% slower at 64 rows)."""


def available(q_NTH: torch.Tensor, k_KSH: torch.Tensor, v_KSH: torch.Tensor) -> bool:
    """True when this call can use the C++ kernel: CPU, no autograd, kernel built."""
    return (q_NTH.device.type == "cpu" and not needs_grad(q_NTH, k_KSH, v_KSH)
            and cpu_ext.load("sparse_attn"))


def sparse_attention_cpp_one(q_NTH: torch.Tensor, k_KSH: torch.Tensor, v_KSH: torch.Tensor,
                             idx_KTk: torch.Tensor, block_size: int, q_offset: int,
                             rows: int | None = None) -> torch.Tensor:
    """One sequence (shapes already validated by `stage2._check`); output in q's dtype."""
    if not cpu_ext.load("sparse_attn"):
        raise RuntimeError("the C++ InfLLM v2 kernel is not available (see warnings)")
    N, T, H = q_NTH.shape
    R = rows if rows is not None else ROWS
    if not (isinstance(R, int) and 1 <= R <= 256):
        raise ValueError(f"rows must be an int in [1, 256], got {R!r}")
    G = N // k_KSH.shape[0]
    # Runs longer than the score budget allows are cut; whole blocks, at least one.
    max_keys = max(1, MAX_KEY_FLOATS // (R * G * block_size)) * block_size
    # bf16 q/k/v go in as they are (the kernel converts only the keys it reads: a decode
    # step must not convert the whole cache); anything else runs in fp32.
    dt = torch.bfloat16 if {q_NTH.dtype, k_KSH.dtype, v_KSH.dtype} == {torch.bfloat16} \
        else torch.float32
    out_NTH = torch.ops.minicpm4_sparse_attn.forward(
        q_NTH.to(dt).contiguous(), k_KSH.to(dt).contiguous(), v_KSH.to(dt).contiguous(),
        idx_KTk.to(torch.int32).contiguous(), block_size, q_offset, R, max_keys,
        1.0 / math.sqrt(H), AVX512)
    return out_NTH.to(q_NTH.dtype)
