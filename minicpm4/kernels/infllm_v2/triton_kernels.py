"""Triton GPU kernels of InfLLM v2 (spec §2.2 steps 3 and 6, §2.4): public entry points.

- `sparse_attention_triton`: stage-2 block-sparse attention, forward and backward
  (`triton_stage2.py`); same contract as `stage2.sparse_attention_reference`.
- `stage1_scores_triton`: stage-1 relevance scores with the fused GQA group sum and the
  two-pass LSE (`triton_stage1.py`); equals `selection.stage1_scores`.

Triton is optional: this module imports without it (`HAVE_TRITON` is False) and the entry
points then raise RuntimeError. The kernel modules are imported lazily, at the first call, so
`TRITON_INTERPRET=1` (CPU tensors, for tests) only has to be set before that call.
Numerics: fp32 accumulation everywhere. bf16/fp16 inputs use the native tensor-core dot
(P and dS are rounded to the input dtype before their dots, as in FlashAttention); fp32
inputs use 3xTF32 dots (about fp32 accuracy; a test path, not tuned). Under the interpreter,
whose bf16 `tl.dot` is wrong, every dot operand is cast to fp32.
Status: verified under the interpreter on CPU against the PyTorch oracles, and compiled for
sm_90 with ptxas (bf16); runs on a real GPU and all timings are still unverified.
"""

from __future__ import annotations

import os

import torch

from minicpm4.kernels.infllm_v2.params import SparseParams

try:
    import triton
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
HAVE_TRITON = triton is not None


def require_triton() -> None:
    """Raise a clear RuntimeError if triton is not installed."""
    if not HAVE_TRITON:
        raise RuntimeError("the InfLLM v2 Triton kernels need the 'triton' package "
                           "(pip install triton==3.9.0, part of the 'dev' extras); use the "
                           "PyTorch backends in minicpm4.kernels.infllm_v2.stage2/selection "
                           "instead")


def interpreting() -> bool:
    """True when kernels run in the Triton CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether the kernels cast `tl.dot` operands to fp32 (see module doc)."""
    return dtype == torch.float32 or interpreting()


def _check_device(*tensors: torch.Tensor) -> None:
    if interpreting():
        return
    bad = [t.device.type for t in tensors if t.device.type != "cuda"]
    if bad:
        raise RuntimeError(f"the Triton kernels need CUDA tensors (got {bad[0]}); set "
                           "TRITON_INTERPRET=1 before the first call to run them on CPU")


def sparse_attention_triton(q_NTH: torch.Tensor, k_KSH: torch.Tensor, v_KSH: torch.Tensor,
                            idx_KTk: torch.Tensor, *, block_size: int, q_offset: int = 0,
                            return_lse: bool = False, seg_tokens: int | None = None,
                            tokens_per_tile: int = 1):
    """InfLLM v2 stage-2 attention on the GPU; differentiable w.r.t. q, k, v.

    Same contract as `stage2.sparse_attention_reference`: q [N, T, H], k/v [K, S, H],
    idx int32 [K, T, k] (block ids, -1 = empty; future blocks and duplicates are dropped),
    S = q_offset + T, or all four with a leading batch dim. Output like q. With
    `return_lse` also returns the fp32 log-sum-exp [N, T] (natural log of the 1/sqrt(H)-scaled
    logits; +inf for a row with no visible key, whose output is 0); it gets no gradient.
    `tokens_per_tile` (power of two): query tokens per forward/dq program. 1 is the paper's
    tile (one token x the G heads, iterating over exactly its blocks); more tokens iterate
    over the union of their blocks with a per-row selection mask, trading extra FLOPs for
    fewer K/V loads. `seg_tokens`: at most this many query tokens per dk/dv program.
    """
    require_triton()
    from minicpm4.kernels.infllm_v2.stage2 import _check_all
    from minicpm4.kernels.infllm_v2.triton_stage2 import sparse_attention_fn
    batch = _check_all(q_NTH, k_KSH, v_KSH, idx_KTk, block_size, q_offset)
    _check_device(q_NTH, k_KSH, v_KSH, idx_KTk)
    q, k, v, idx = (t if batch else t[None] for t in (q_NTH, k_KSH, v_KSH, idx_KTk))
    out, lse = sparse_attention_fn(q, k, v, idx, block_size, q_offset, seg_tokens,
                                   tokens_per_tile)
    if not batch:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def stage1_scores_triton(q_NTH: torch.Tensor, kc1_KCH: torch.Tensor, *, q_offset: int,
                         params: SparseParams, lse: str = "approx",
                         kc2_KCH: torch.Tensor | None = None) -> torch.Tensor:
    """Stage-1 scores fp32 [K, T, C1] on the GPU; equals `selection.stage1_scores`.

    Pass 1 computes each (head, query) LSE over the visible coarse keys Kc2 ("approx",
    falling back to Kc1 while no Kc2 is visible) or over Kc1 ("exact"); pass 2 sums the
    normalised probabilities over the G heads of a KV group in registers, so only the
    [K, T, C1] group scores are written. No gradient (selection is not differentiable).
    """
    require_triton()
    from minicpm4.kernels.infllm_v2.selection import _check_lse, _check_q_kc
    from minicpm4.kernels.infllm_v2.triton_stage1 import stage1_scores_launch
    _check_q_kc(q_NTH, kc1_KCH, "q_NTH", "kc1_KCH")
    _check_lse(lse)
    if lse == "approx":
        if kc2_KCH is None:
            raise ValueError("lse='approx' needs the coarse keys kc2_KCH")
        _check_q_kc(q_NTH, kc2_KCH, "q_NTH", "kc2_KCH")
    if q_offset < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    _check_device(q_NTH, kc1_KCH, *([kc2_KCH] if kc2_KCH is not None else []))
    with torch.no_grad():
        return stage1_scores_launch(q_NTH, kc1_KCH, kc2_KCH if lse == "approx" else None,
                                    q_offset=q_offset, params=params)
