"""InfLLM v2 block selection through the fused C++ CPU kernel (spec §2.2 steps 3-5, §2.3).

`csrc/sparse_select.cpp` computes, per KV head and tile of query tokens, the stage-1 scores
against the visible compressed keys, the (approximate or exact) LSE, the group sum, the
block max-pool with forced sink/local blocks and the top-k, all in cache-sized tiles: the
[N, T, C] score tensor of the PyTorch path is never built, and no pass over it goes through
memory. Same rules and output as `selection.select_blocks` (int32 [K, T, k], ascending, -1
for future slots at the end). The scores are summed in a different order than PyTorch's, so
a row whose k-th and (k+1)-th block scores are equal to rounding may pick the other block;
tests/kernels/test_infllm_v2_cpp.py checks every difference is such a tie.
`select_blocks_fast` / `select_decode_fast` take this kernel for CPU inference when it is
built (`kernels/cpu_ext.py`), else the PyTorch functions of `selection.py`.
Shape legend: N query heads, K kv heads, T queries, S keys, H head dim, C compressed keys.
"""

from __future__ import annotations

import torch

from minicpm4.kernels import cpu_ext
from minicpm4.kernels.infllm_v2.params import SparseParams
from minicpm4.kernels.infllm_v2.decode_selection import (CompressedKeyBuffer, check_decode,
                                                         select_blocks_decode)
from minicpm4.kernels.infllm_v2.selection import _prepare, compress_keys, select_blocks_chunked

ROWS = 16
"""Query tokens per work item: M = ROWS * G packed rows share each compressed-key load."""


def available(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and cpu_ext.load("sparse_select")


def _run(q_NTH, kc1_KCH, kc2_KCH, *, q_offset: int, num_keys: int, params: SparseParams,
         lse: str) -> torch.Tensor:
    approx = lse == "approx"  # lse is checked by the callers (_prepare / check_decode)
    kc2 = kc2_KCH if approx and kc2_KCH is not None else kc1_KCH[:, :0]
    return torch.ops.minicpm4_sparse_select.forward(
        q_NTH.float().contiguous(), kc1_KCH.float().contiguous(), kc2.float().contiguous(),
        q_offset, num_keys, params.kernel_size, params.kernel_stride, params.coarse_kernel,
        params.coarse_stride, params.block_size, params.init_blocks, params.local_blocks,
        params.num_selected, approx, ROWS)


def select_blocks_cpp(q_NTH: torch.Tensor, k_KSH: torch.Tensor, *, q_offset: int = 0,
                      params: SparseParams, lse: str = "exact",
                      k_nope_KSH: torch.Tensor | None = None,
                      q_nope_NTH: torch.Tensor | None = None) -> torch.Tensor:
    """`selection.select_blocks` through the C++ kernel (RuntimeError if it is not built)."""
    if not cpu_ext.load("sparse_select"):
        raise RuntimeError("the C++ InfLLM v2 selection kernel is not available (see warnings)")
    with torch.no_grad():
        q_NTH, k_KSH = _prepare(q_NTH, k_KSH, q_offset, params, lse, k_nope_KSH, q_nope_NTH)
        k_KSH = k_KSH.float()
        kc1_KCH = compress_keys(k_KSH, params.kernel_size, params.kernel_stride)
        kc2_KCH = (compress_keys(k_KSH, params.coarse_kernel, params.coarse_stride)
                   if lse == "approx" else None)
        return _run(q_NTH, kc1_KCH, kc2_KCH, q_offset=q_offset, num_keys=k_KSH.shape[1],
                    params=params, lse=lse)


def select_blocks_fast(q_NTH: torch.Tensor, k_KSH: torch.Tensor, *, q_offset: int = 0,
                       params: SparseParams, lse: str = "exact",
                       k_nope_KSH: torch.Tensor | None = None,
                       q_nope_NTH: torch.Tensor | None = None) -> torch.Tensor:
    """The C++ selection when built and on CPU, else `select_blocks_chunked`."""
    fn = select_blocks_cpp if available(q_NTH) else select_blocks_chunked
    return fn(q_NTH, k_KSH, q_offset=q_offset, params=params, lse=lse,
              k_nope_KSH=k_nope_KSH, q_nope_NTH=q_nope_NTH)


def select_decode_fast(q_NH: torch.Tensor, buffer: CompressedKeyBuffer, *, cache_len: int,
                       params: SparseParams, lse: str = "exact") -> torch.Tensor:
    """`selection.select_blocks_decode`, through the C++ kernel when available."""
    if not available(q_NH):
        return select_blocks_decode(q_NH, buffer, cache_len=cache_len, params=params, lse=lse)
    check_decode(q_NH, buffer, cache_len=cache_len, params=params, lse=lse)
    with torch.no_grad():
        return _run(q_NH[:, None], buffer.kc1_KCH, buffer.kc2_KCH, q_offset=cache_len,
                    num_keys=cache_len + 1, params=params, lse=lse)
