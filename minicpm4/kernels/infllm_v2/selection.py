"""InfLLM v2 block selection (spec §2.2 steps 2-5, §2.3): which KV blocks each query attends.

Pipeline: mean-pool the keys into compressed keys Kc1 (and coarse Kc2) -> stage-1 scores
(softmax over visible Kc1, summed over the G query heads of a KV group) -> block scores by
max-pooling overlapping kernels, forced sink/local blocks = +inf, future blocks = -inf ->
top-(topk + local_blocks) -> int32 block ids, ascending, future slots = -1 (at the row's end).

`select_blocks` is the plain reference (one [N, T, C] tensor); `select_blocks_chunked` is the
memory-bounded default (query chunks, fused masks, F.max_pool1d); `select_blocks_varlen` loops
over packed sequences; one-token decode is in `decode_selection.py`.
Rules and conventions: docs/infllm_v2_selection.md.

Shape legend: N query heads, K kv heads, G = N // K, T queries, S keys, H head dim,
C compressed keys, B blocks, k selected ids per row. Query i sits at absolute position
p = q_offset + i and the keys are the whole sequence so far (S = q_offset + T).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from minicpm4.kernels.infllm_v2.params import SparseParams

LSE_MODES = ("exact", "approx")
_INF = float("inf")


def compress_keys(k_KSH: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Mean pooling (spec §2.2 step 2): kc[j] = mean(k[stride*j : stride*j + kernel]).

    Only complete chunks: floor((S - kernel) / stride) + 1 of them, 0 if S < kernel.
    Plain torch ops, so differentiable; keeps k's dtype.
    """
    if k_KSH.dim() != 3:
        raise ValueError(f"k_KSH must be [K, S, H], got shape {tuple(k_KSH.shape)}")
    if k_KSH.shape[1] < kernel:
        return k_KSH[:, :0]
    return k_KSH.unfold(1, kernel, stride).mean(-1)


def _check_q_kc(q_NTH: torch.Tensor, kc_KCH: torch.Tensor, qname: str, kname: str) -> None:
    if q_NTH.dim() != 3:
        raise ValueError(f"{qname} must be [N, T, H], got shape {tuple(q_NTH.shape)}")
    if kc_KCH.dim() != 3:
        raise ValueError(f"{kname} must be [K, S, H], got shape {tuple(kc_KCH.shape)}")
    N, K = q_NTH.shape[0], kc_KCH.shape[0]
    if K == 0 or N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
    if q_NTH.shape[-1] != kc_KCH.shape[-1]:
        raise ValueError(f"head dims differ: {qname} has {q_NTH.shape[-1]}, "
                         f"{kname} has {kc_KCH.shape[-1]}")


def _check_lse(lse: str) -> None:
    if lse not in LSE_MODES:
        raise ValueError(f"lse must be one of {LSE_MODES}, got {lse!r}")


def stage1_scores(q_NTH: torch.Tensor, kc1_KCH: torch.Tensor, *, q_offset: int,
                  params: SparseParams, lse: str = "exact",
                  kc2_KCH: torch.Tensor | None = None) -> torch.Tensor:
    """Stage-1 relevance S[g, i, j] (spec §2.2 step 3), fp32 [K, T, C1]; reference version.

    p[h,i,j] = exp(q_{h,i}.kc1_j / sqrt(H) - LSE[h,i]) for visible j, else 0, where Kc1 j is
    visible to position p iff its whole kernel is in the past: stride*j + kernel - 1 <= p.
    LSE "exact": logsumexp over visible Kc1; "approx": over visible Kc2 (coarse_stride*j +
    coarse_kernel - 1 <= p), falling back to the exact LSE while no Kc2 is visible yet.
    Then summed over the G heads of each KV group; NaN (no visible key) -> 0.
    """
    _check_q_kc(q_NTH, kc1_KCH, "q_NTH", "kc1_KCH")
    _check_lse(lse)
    if lse == "approx" and kc2_KCH is None:
        raise ValueError("lse='approx' needs the coarse keys kc2_KCH")
    N, T, H = q_NTH.shape
    K, C, _ = kc1_KCH.shape
    pos_T1 = (torch.arange(T, device=q_NTH.device) + q_offset)[:, None]
    q_KGTH = q_NTH.float().reshape(K, N // K, T, H)

    def masked_logits(kc_KCH: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
        j_1C = torch.arange(kc_KCH.shape[1], device=q_NTH.device)[None, :]
        visible_TC = stride * j_1C + kernel - 1 <= pos_T1
        logits_KGTC = q_KGTH @ kc_KCH.float()[:, None].transpose(-1, -2) / math.sqrt(H)
        return logits_KGTC.masked_fill(~visible_TC, -_INF), visible_TC

    logits_KGTC, _ = masked_logits(kc1_KCH, params.kernel_size, params.kernel_stride)
    lse_KGT = torch.logsumexp(logits_KGTC, dim=-1)
    if lse == "approx":
        _check_q_kc(q_NTH, kc2_KCH, "q_NTH", "kc2_KCH")
        logits2_KGTC, visible2_TC = masked_logits(kc2_KCH, params.coarse_kernel,
                                                  params.coarse_stride)
        lse_KGT = torch.where(visible2_TC.any(-1), torch.logsumexp(logits2_KGTC, -1), lse_KGT)
    probs_KGTC = torch.exp(logits_KGTC - lse_KGT[..., None])
    probs_KGTC = probs_KGTC.masked_fill(probs_KGTC.isnan(), 0.0)
    return probs_KGTC.sum(1)


def _forced_future(q_offset: int, T: int, num_blocks: int, params: SparseParams,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(forced_TB, future_TB, q_blk_T): sink / local-window / current blocks, and b > q_blk."""
    q_blk_T1 = ((torch.arange(T, device=device) + q_offset) // params.block_size)[:, None]
    b_1B = torch.arange(num_blocks, device=device)[None, :]
    forced_TB = (b_1B < params.init_blocks) | ((b_1B >= q_blk_T1 - params.local_blocks)
                                               & (b_1B <= q_blk_T1))
    return forced_TB, b_1B > q_blk_T1, q_blk_T1[:, 0]


def block_scores(S_KTC: torch.Tensor, *, q_offset: int, num_blocks: int,
                 params: SparseParams) -> torch.Tensor:
    """Block scores [K, T, num_blocks] (spec §2.2 step 4); reference version.

    Block b = max of S[..., ps*b - 1 .. ps*b + ps - 1] (ps = pool_stride; max_pool1d with
    kernel ps+1, stride ps, padding 1; out-of-range entries ignored, -inf if none). Then
    +inf for b < init_blocks or q_blk - local_blocks <= b <= q_blk (q_blk = p // block_size),
    and -inf for future blocks b > q_blk (applied last, so it wins over the sink rule).
    """
    if S_KTC.dim() != 3:
        raise ValueError(f"S_KTC must be [K, T, C], got shape {tuple(S_KTC.shape)}")
    K, T, C = S_KTC.shape
    ps = params.pool_stride
    out_KTB = S_KTC.new_full((K, T, num_blocks), -_INF)
    for b in range(num_blocks):
        lo, hi = max(ps * b - 1, 0), min(ps * b + ps, C)
        if lo < hi:
            out_KTB[..., b] = S_KTC[..., lo:hi].amax(-1)
    forced_TB, future_TB, _ = _forced_future(q_offset, T, num_blocks, params, S_KTC.device)
    return out_KTB.masked_fill(forced_TB, _INF).masked_fill(future_TB, -_INF)


def _finish(top_KTk: torch.Tensor, q_blk_T: torch.Tensor) -> torch.Tensor:
    """Ascending ids; ids > q_blk (future) -> -1, which lands them at the end of the row."""
    idx_KTk = top_KTk.sort(-1).values
    return idx_KTk.masked_fill(idx_KTk > q_blk_T[None, :, None], -1).to(torch.int32)


def _prepare(q_NTH, k_KSH, q_offset, params, lse, k_nope_KSH, q_nope_NTH):
    if not isinstance(params, SparseParams):
        raise TypeError(f"params must be a SparseParams, got {type(params).__name__}")
    _check_lse(lse)
    _check_q_kc(q_NTH, k_KSH, "q_NTH", "k_KSH")
    if params.use_nope:
        if k_nope_KSH is None or q_nope_NTH is None:
            raise ValueError("params.use_nope needs q_nope_NTH and k_nope_KSH (pre-RoPE q/k)")
        if q_nope_NTH.shape != q_NTH.shape or k_nope_KSH.shape != k_KSH.shape:
            raise ValueError(f"pre-RoPE shapes {tuple(q_nope_NTH.shape)}/"
                             f"{tuple(k_nope_KSH.shape)} differ from q/k shapes "
                             f"{tuple(q_NTH.shape)}/{tuple(k_KSH.shape)}")
        q_NTH, k_KSH = q_nope_NTH, k_nope_KSH
    T, S = q_NTH.shape[1], k_KSH.shape[1]
    if q_offset < 0 or S != q_offset + T:
        raise ValueError(f"keys must be the whole sequence: expected S = q_offset + T = "
                         f"{q_offset} + {T}, got S = {S}")
    return q_NTH, k_KSH


def select_blocks(q_NTH: torch.Tensor, k_KSH: torch.Tensor, *, q_offset: int = 0,
                  params: SparseParams, lse: str = "exact",
                  k_nope_KSH: torch.Tensor | None = None,
                  q_nope_NTH: torch.Tensor | None = None) -> torch.Tensor:
    """Reference block selection (spec §2.2 steps 2-5): int32 [K, T, min(num_selected, B)].

    B = ceil(S / block_size). Row = the selected block ids ascending, then -1 for slots that
    top-k filled with future blocks. Ties go to the lower block id (stable sort). Builds the
    full [N, T, C1] score tensor: use `select_blocks_chunked` for long inputs.
    With params.use_nope the pre-RoPE q/k are used instead of q_NTH/k_KSH.
    """
    with torch.no_grad():
        q_NTH, k_KSH = _prepare(q_NTH, k_KSH, q_offset, params, lse, k_nope_KSH, q_nope_NTH)
        T, S = q_NTH.shape[1], k_KSH.shape[1]
        kc1_KCH = compress_keys(k_KSH, params.kernel_size, params.kernel_stride)
        kc2_KCH = (compress_keys(k_KSH, params.coarse_kernel, params.coarse_stride)
                   if lse == "approx" else None)
        S_KTC = stage1_scores(q_NTH, kc1_KCH, q_offset=q_offset, params=params, lse=lse,
                              kc2_KCH=kc2_KCH)
        num_blocks = -(-S // params.block_size)
        scores_KTB = block_scores(S_KTC, q_offset=q_offset, num_blocks=num_blocks,
                                  params=params)
        order_KTB = scores_KTB.sort(dim=-1, descending=True, stable=True).indices
        width = min(params.num_selected, num_blocks)
        q_blk_T = (torch.arange(T, device=q_NTH.device) + q_offset) // params.block_size
        return _finish(order_KTB[..., :width], q_blk_T)


def _num_visible(pos_T: torch.Tensor, kernel: int, stride: int, count: int) -> torch.Tensor:
    """How many compressed keys each position sees: j visible iff stride*j + kernel - 1 <= p."""
    return (torch.div(pos_T + 1 - kernel, stride, rounding_mode="floor") + 1).clamp(0, count)


def _select_compressed(q_NTH: torch.Tensor, kc1_KCH: torch.Tensor, kc2_KCH: torch.Tensor | None,
                       *, q_offset: int, num_blocks: int, params: SparseParams,
                       lse: str) -> torch.Tensor:
    """Fused steps 3-5 for one query chunk; the same maths as the reference functions.

    Only the Kc1/Kc2 prefix visible to the chunk's last query is multiplied; keys visible to
    none of the chunk's queries score 0, as in the reference.
    """
    N, T, H = q_NTH.shape
    K, C, _ = kc1_KCH.shape
    G, dev = N // K, q_NTH.device
    pos_T = torch.arange(T, device=dev) + q_offset
    q_KXH = q_NTH.float().reshape(K, G * T, H) / math.sqrt(H)

    def masked_logits(kc_KCH, kernel, stride):
        n_T = _num_visible(pos_T, kernel, stride, kc_KCH.shape[1])
        used = int(n_T.max()) if T else 0
        kc_KHC = kc_KCH[:, :used].float().transpose(1, 2)
        logits_KGTC = torch.bmm(q_KXH, kc_KHC).view(K, G, T, used)
        hidden_TC = torch.arange(used, device=dev)[None, :] >= n_T[:, None]
        return logits_KGTC.masked_fill_(hidden_TC, -_INF), n_T

    logits_KGTC, _ = masked_logits(kc1_KCH, params.kernel_size, params.kernel_stride)
    used = logits_KGTC.shape[-1]
    if lse == "approx":  # the exact LSE only for rows that see no coarse key yet
        logits2_KGTC, n2_T = masked_logits(kc2_KCH, params.coarse_kernel, params.coarse_stride)
        lse_KGT = torch.logsumexp(logits2_KGTC, -1)
        if bool((n2_T == 0).any()):
            lse_KGT = torch.where(n2_T > 0, lse_KGT, torch.logsumexp(logits_KGTC, -1))
    else:
        lse_KGT = torch.logsumexp(logits_KGTC, dim=-1)
    # No visible key: LSE = -inf; use 0 so every (-inf) logit maps to probability 0, not NaN.
    lse_KGT = lse_KGT.masked_fill(torch.isneginf(lse_KGT), 0.0)
    S_KTU = logits_KGTC.sub_(lse_KGT[..., None]).exp_().sum(1)
    del logits_KGTC
    # Max-pool as in `block_scores`: pad so block b covers padded[ps*b .. ps*b + ps].
    ps = params.pool_stride
    L = ps * num_blocks + 1
    padded_KTL = S_KTU.new_full((K, T, L), -_INF)
    padded_KTL[..., 1:used + 1] = S_KTU
    padded_KTL[..., used + 1:C + 1] = 0.0
    del S_KTU
    scores_KTB = F.max_pool1d(padded_KTL.view(K * T, 1, L), ps + 1, ps).view(K, T, num_blocks)
    del padded_KTL
    forced_TB, future_TB, q_blk_T = _forced_future(q_offset, T, num_blocks, params, dev)
    scores_KTB.masked_fill_(forced_TB, _INF).masked_fill_(future_TB, -_INF)
    # Deterministic top-k, ties to the lower block id: scores are >= 0 or -inf, so the fp32
    # bit pattern orders them; key = bits * B + (B - 1 - b) with bits(-inf) := -1.
    bits_KTB = (scores_KTB.clamp_min(0.0) + 0.0).view(torch.int32).long()
    bits_KTB.masked_fill_(torch.isneginf(scores_KTB), -1)
    key_KTB = bits_KTB.mul_(num_blocks).add_(torch.arange(num_blocks - 1, -1, -1, device=dev))
    width = min(params.num_selected, num_blocks)
    return _finish(key_KTB.topk(width, dim=-1, sorted=False).indices, q_blk_T)


def _auto_chunk(N: int, K: int, C: int, C2: int, num_blocks: int, ps: int, max_bytes: int):
    # logits (+ a logsumexp temporary of the same size), S, padded S, block scores, int64 keys
    per_query = 8 * N * (C + C2) + 4 * K * (C + 2 * (ps * num_blocks + 1)) + 24 * K * num_blocks
    return max(1, max_bytes // max(per_query, 1))


def select_blocks_chunked(q_NTH: torch.Tensor, k_KSH: torch.Tensor, *, q_offset: int = 0,
                          params: SparseParams, lse: str = "exact",
                          k_nope_KSH: torch.Tensor | None = None,
                          q_nope_NTH: torch.Tensor | None = None,
                          chunk_size: int | None = None,
                          max_chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """`select_blocks` with the queries processed in chunks: the same int32 [K, T, k] result.

    Peak extra memory is about `max_chunk_bytes` (fp32 scores of one chunk) unless
    `chunk_size` fixes the number of queries per chunk. This is the default implementation.
    """
    with torch.no_grad():
        q_NTH, k_KSH = _prepare(q_NTH, k_KSH, q_offset, params, lse, k_nope_KSH, q_nope_NTH)
        N, T, _ = q_NTH.shape
        K, S, _ = k_KSH.shape
        kc1_KCH = compress_keys(k_KSH, params.kernel_size, params.kernel_stride)
        kc2_KCH = (compress_keys(k_KSH, params.coarse_kernel, params.coarse_stride)
                   if lse == "approx" else None)
        num_blocks = -(-S // params.block_size)
        width = min(params.num_selected, num_blocks)
        if chunk_size is None:
            C2 = 0 if kc2_KCH is None else kc2_KCH.shape[1]
            chunk_size = _auto_chunk(N, K, kc1_KCH.shape[1], C2, num_blocks,
                                     params.pool_stride, max_chunk_bytes)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        out_KTk = torch.empty(K, T, width, dtype=torch.int32, device=q_NTH.device)
        for t0 in range(0, T, chunk_size):
            t1 = min(t0 + chunk_size, T)
            out_KTk[:, t0:t1] = _select_compressed(
                q_NTH[:, t0:t1], kc1_KCH, kc2_KCH, q_offset=q_offset + t0,
                num_blocks=num_blocks, params=params, lse=lse)
        return out_KTk


def select_blocks_varlen(q_NTH: torch.Tensor, k_KSH: torch.Tensor, *,
                         cu_seqlens_q: Sequence[int] | torch.Tensor,
                         cu_seqlens_k: Sequence[int] | torch.Tensor, params: SparseParams,
                         lse: str = "exact", k_nope_KSH: torch.Tensor | None = None,
                         q_nope_NTH: torch.Tensor | None = None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Packed batch: sequence b owns queries [cu_q[b], cu_q[b+1]) of dim 1 of q_NTH and keys
    [cu_k[b], cu_k[b+1]) of k_KSH; its queries are the tail of its keys (q_offset = len_k -
    len_q). Returns int32 [K, total_q, min(num_selected, max_b B_b)], rows padded with -1.
    """
    cq = [int(x) for x in cu_seqlens_q]
    ck = [int(x) for x in cu_seqlens_k]
    if len(cq) != len(ck) or len(cq) < 1 or cq[0] != 0 or ck[0] != 0:
        raise ValueError(f"cu_seqlens_q/cu_seqlens_k must both start at 0 and have the same "
                         f"length, got {cq} and {ck}")
    if cq[-1] != q_NTH.shape[1] or ck[-1] != k_KSH.shape[1]:
        raise ValueError(f"cu_seqlens end at {cq[-1]}/{ck[-1]} but q/k hold "
                         f"{q_NTH.shape[1]}/{k_KSH.shape[1]} tokens")
    lens_q = [b - a for a, b in zip(cq, cq[1:])]
    lens_k = [b - a for a, b in zip(ck, ck[1:])]
    if any(lq < 0 or lk < lq for lq, lk in zip(lens_q, lens_k)):
        raise ValueError(f"each sequence needs 0 <= len_q <= len_k, got {lens_q} / {lens_k}")
    width = min(params.num_selected, max([-(-lk // params.block_size) for lk in lens_k] + [0]))
    out_KTk = torch.full((k_KSH.shape[0], cq[-1], width), -1, dtype=torch.int32,
                         device=q_NTH.device)
    use_nope = params.use_nope
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        idx_KTk = select_blocks_chunked(
            q_NTH[:, qs], k_KSH[:, ks], q_offset=lk - lq, params=params, lse=lse,
            k_nope_KSH=k_nope_KSH[:, ks] if use_nope and k_nope_KSH is not None else None,
            q_nope_NTH=q_nope_NTH[:, qs] if use_nope and q_nope_NTH is not None else None,
            chunk_size=chunk_size)
        out_KTk[:, qs, :idx_KTk.shape[-1]] = idx_KTk
    return out_KTk
