"""Triton kernel of InfLLM v2 stage 1 (spec §2.2 step 3, §2.4): fused group-sum scores.

Imported lazily by `triton_kernels.stage1_scores_triton` (needs triton).

Grid (cdiv(T, BLOCK_T), K). A program owns BLOCK_T query tokens x the G heads of one KV
group: M = BLOCK_T * BLOCK_G rows, row r = token r // BLOCK_G, head r % BLOCK_G (heads padded
to a power of two and masked). Compressed key j (kernel l, stride s) is visible to position
p iff s*j + l - 1 <= p, so each program only visits the keys visible to its last token.

- Pass 1 (`_lse_pass`): online max/sum in base 2 over the visible Kc2 ("approx") or Kc1
  ("exact"). In approx mode, rows that see no Kc2 yet (the first coarse_kernel - 1
  positions) fall back to the exact LSE over Kc1; the Kc1 pass runs only for tiles that hold
  such rows, so the overhead stays ~1.25x instead of 2x (spec §2.4).
- Pass 2: p = exp(logit - LSE) on visible Kc1 (0 elsewhere, so a row without visible keys
  contributes 0, like the reference's NaN -> 0), summed over the heads in registers
  (reshape to [BLOCK_T, BLOCK_G, BLOCK_C] and reduce), and only the [K, T, C1] group scores
  are stored; chunks past the tile's visible range are stored as zeros.
"""

import math

import torch
import triton
import triton.language as tl

from minicpm4.kernels.infllm_v2.params import SparseParams
from minicpm4.kernels.infllm_v2.triton_kernels import upcast_dots
from minicpm4.kernels.infllm_v2.triton_stage2 import LOG2E, _mm


@triton.jit
def _num_visible(pos, C, KER: tl.constexpr, STR: tl.constexpr):
    """How many compressed keys position `pos` sees (scalar)."""
    n = tl.where(pos + 1 >= KER, (tl.maximum(pos + 1 - KER, 0) // STR) + 1, 0)
    return tl.minimum(n, C)


@triton.jit
def _lse_pass(q, KC, kc_base, C, hi, pos, r_ok, qk_scale, KER: tl.constexpr,
              STR: tl.constexpr, M: tl.constexpr, H: tl.constexpr, BLOCK_C: tl.constexpr,
              UPCAST: tl.constexpr):
    """(m, l) per row, base 2: logsumexp2 = m + log2(l) over the visible keys j < hi."""
    offs_h = tl.arange(0, H)
    m = tl.full([M], float("-inf"), tl.float32)
    l = tl.zeros([M], tl.float32)
    for c0 in range(0, hi, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        j_ok = j < C
        kc = tl.load(KC + (kc_base + j)[:, None] * H + offs_h[None, :], mask=j_ok[:, None],
                     other=0.0)
        qk = _mm(q, tl.trans(kc), UPCAST) * qk_scale
        vis = r_ok[:, None] & j_ok[None, :] & (STR * j[None, :] + KER - 1 <= pos[:, None])
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(qk - m_safe[:, None]), 1)
        m = m_new
    return m, l


@triton.jit
def _stage1_kernel(Q, KC1, KC2, OUT, N, K, T, C1, C2, q_offset, qk_scale,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_C: tl.constexpr, H: tl.constexpr, KER1: tl.constexpr,
                   STR1: tl.constexpr, KER2: tl.constexpr, STR2: tl.constexpr,
                   APPROX: tl.constexpr, UPCAST: tl.constexpr):
    M: tl.constexpr = BLOCK_T * BLOCK_G
    t0 = tl.program_id(0) * BLOCK_T
    kh = tl.program_id(1)
    offs_m = tl.arange(0, M)
    offs_h = tl.arange(0, H)
    t = t0 + offs_m // BLOCK_G
    g = offs_m % BLOCK_G
    r_ok = (t < T) & (g < G)
    pos = q_offset + t
    rows = (kh * G + g).to(tl.int64) * T + t
    q = tl.load(Q + rows[:, None] * H + offs_h[None, :], mask=r_ok[:, None], other=0.0)
    pos_min = q_offset + t0
    pos_max = q_offset + tl.minimum(t0 + BLOCK_T, T) - 1
    hi1 = _num_visible(pos_max, C1, KER1, STR1)
    base1 = kh.to(tl.int64) * C1
    if APPROX:
        hi2 = _num_visible(pos_max, C2, KER2, STR2)
        m2, l2 = _lse_pass(q, KC2, kh.to(tl.int64) * C2, C2, hi2, pos, r_ok, qk_scale, KER2,
                           STR2, M, H, BLOCK_C, UPCAST)
        hi_fb = tl.where(_num_visible(pos_min, C2, KER2, STR2) == 0, hi1, 0)
        m1, l1 = _lse_pass(q, KC1, base1, C1, hi_fb, pos, r_ok, qk_scale, KER1, STR1, M, H,
                           BLOCK_C, UPCAST)
        use2 = l2 > 0
        m = tl.where(use2, m2, m1)
        l = tl.where(use2, l2, l1)
    else:
        m, l = _lse_pass(q, KC1, base1, C1, hi1, pos, r_ok, qk_scale, KER1, STR1, M, H,
                         BLOCK_C, UPCAST)
    lse2 = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), 0.0)
    t_out = t0 + tl.arange(0, BLOCK_T)
    out_rows = (kh * T + t_out).to(tl.int64) * C1
    for c0 in range(0, hi1, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        j_ok = j < C1
        kc = tl.load(KC1 + (base1 + j)[:, None] * H + offs_h[None, :], mask=j_ok[:, None],
                     other=0.0)
        qk = _mm(q, tl.trans(kc), UPCAST) * qk_scale
        vis = r_ok[:, None] & j_ok[None, :] & (STR1 * j[None, :] + KER1 - 1 <= pos[:, None])
        p = tl.where(vis, tl.exp2(qk - lse2[:, None]), 0.0)
        s = tl.sum(tl.reshape(p, [BLOCK_T, BLOCK_G, BLOCK_C]), 1)
        tl.store(OUT + out_rows[:, None] + j[None, :], s,
                 mask=(t_out < T)[:, None] & j_ok[None, :])
    zeros = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for c0 in range(tl.cdiv(hi1, BLOCK_C) * BLOCK_C, C1, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        tl.store(OUT + out_rows[:, None] + j[None, :], zeros,
                 mask=(t_out < T)[:, None] & (j < C1)[None, :])


def stage1_scores_launch(q_NTH: torch.Tensor, kc1_KCH: torch.Tensor,
                         kc2_KCH: torch.Tensor | None, *, q_offset: int,
                         params: SparseParams, rows: int | None = None,
                         block_c: int | None = None) -> torch.Tensor:
    """Launch `_stage1_kernel`: fp32 [K, T, C1]; kc2_KCH None means the exact LSE.

    `rows` = target BLOCK_T * BLOCK_G (>= 16), `block_c` = compressed keys per step; by
    default 128 / 64 for 16-bit inputs, 64 / 32 for fp32 (3xTF32 needs more shared memory).
    Untuned; checked only by compiling for sm_90 (no spills, <= 128 KiB shared memory)."""
    N, T, H = q_NTH.shape
    K, C1, _ = kc1_KCH.shape
    if H & (H - 1) or H < 16:
        raise ValueError(f"the Triton stage-1 kernel needs a power-of-two head dim >= 16, "
                         f"got {H}")
    G = N // K
    approx = kc2_KCH is not None
    dtype = torch.promote_types(q_NTH.dtype, kc1_KCH.dtype)
    if approx:
        dtype = torch.promote_types(dtype, kc2_KCH.dtype)
    rows = rows or (64 if dtype == torch.float32 else 128)
    block_c = block_c or (32 if dtype == torch.float32 else 64)
    block_g = triton.next_power_of_2(G)
    block_t = max(1, max(rows, 16) // block_g)
    out = torch.empty(K, T, C1, dtype=torch.float32, device=q_NTH.device)
    if T == 0 or C1 == 0:
        return out.zero_()
    q = q_NTH.to(dtype).contiguous()
    kc1 = kc1_KCH.to(dtype).contiguous()
    kc2 = kc2_KCH.to(dtype).contiguous() if approx else kc1
    grid = (triton.cdiv(T, block_t), K)
    _stage1_kernel[grid](q, kc1, kc2, out, N, K, T, C1, kc2.shape[1], q_offset,
                         LOG2E / math.sqrt(H), G=G, BLOCK_G=block_g, BLOCK_T=block_t,
                         BLOCK_C=block_c, H=H, KER1=params.kernel_size,
                         STR1=params.kernel_stride, KER2=params.coarse_kernel,
                         STR2=params.coarse_stride, APPROX=approx,
                         UPCAST=upcast_dots(q.dtype), num_warps=4)
    return out
