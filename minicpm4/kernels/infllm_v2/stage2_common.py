"""Checks and shared helpers of InfLLM v2 stage 2 (spec §2.2 step 6): argument validation,
the per-token block selection table, the dense mask used by tests and the masked backend,
and the per-sequence/batch dispatch shared by every backend (`stage2.py` documents them).
Shape legend: B batch, N query heads, K kv heads, T queries, S keys, H head dim, k slots,
b / nb key blocks.
"""

from __future__ import annotations

import torch


def _check(q_NTH, k_KSH, v_KSH, idx_KTk, block_size: int, q_offset: int) -> None:
    """Raise ValueError unless the per-sequence shapes and indices agree (see module doc)."""
    if q_NTH.dim() != 3 or k_KSH.dim() != 3 or v_KSH.dim() != 3 or idx_KTk.dim() != 3:
        raise ValueError("expected q [N, T, H], k/v [K, S, H], idx [K, T, k], got "
                         f"{tuple(q_NTH.shape)}, {tuple(k_KSH.shape)}, {tuple(v_KSH.shape)}, "
                         f"{tuple(idx_KTk.shape)}")
    (N, T, H), (K, S, Hk) = q_NTH.shape, k_KSH.shape
    if v_KSH.shape != k_KSH.shape:
        raise ValueError(f"k {tuple(k_KSH.shape)} and v {tuple(v_KSH.shape)} differ")
    if Hk != H:
        raise ValueError(f"head dim of q ({H}) and k ({Hk}) differ")
    if K == 0 or N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}")
    if idx_KTk.shape[:2] != (K, T):
        raise ValueError(f"idx must be [K={K}, T={T}, k], got {tuple(idx_KTk.shape)}")
    if idx_KTk.dtype.is_floating_point or idx_KTk.dtype == torch.bool:
        raise ValueError(f"idx must be an integer tensor, got {idx_KTk.dtype}")
    if block_size <= 0 or q_offset < 0:
        raise ValueError(f"need block_size > 0 and q_offset >= 0, got {block_size}, {q_offset}")
    if S != q_offset + T:
        raise ValueError(f"keys must be the whole prefix: S={S} != q_offset={q_offset} + T={T}")
    nb = -(-S // block_size)
    if idx_KTk.numel() and (int(idx_KTk.min()) < -1 or int(idx_KTk.max()) >= nb):
        raise ValueError(f"block indices must lie in [-1, {nb}) for S={S}, "
                         f"block_size={block_size}; got [{int(idx_KTk.min())}, "
                         f"{int(idx_KTk.max())}]")


def _selection(idx_KTk: torch.Tensor, num_blocks: int, block_size: int,
               q_offset: int) -> torch.Tensor:
    """bool [K, T, nb]: block b selected for the query and not in its future."""
    K, T, _ = idx_KTk.shape
    sel_KTb = torch.zeros(K, T, num_blocks + 1, dtype=torch.bool, device=idx_KTk.device)
    slot_KTk = torch.where(idx_KTk < 0, num_blocks, idx_KTk).long()
    sel_KTb.scatter_(2, slot_KTk, True)
    qblk_T1 = (q_offset + torch.arange(T, device=idx_KTk.device)[:, None]) // block_size
    return sel_KTb[..., :num_blocks] & (torch.arange(num_blocks, device=idx_KTk.device) <= qblk_T1)


def block_mask_from_indices(idx_KTk: torch.Tensor, *, num_keys: int, block_size: int,
                            q_offset: int = 0) -> torch.Tensor:
    """Dense bool [K, T, S] (True = visible): the selected blocks AND causality (for tests)."""
    K, T, _ = idx_KTk.shape
    nb = -(-num_keys // block_size)
    sel_KTb = _selection(idx_KTk, nb, block_size, q_offset)
    mask_KTS = sel_KTb.repeat_interleave(block_size, dim=-1)[..., :num_keys]
    pos_T1 = q_offset + torch.arange(T, device=idx_KTk.device)[:, None]
    return mask_KTS & (torch.arange(num_keys, device=idx_KTk.device) <= pos_T1)


def _check_all(q, k, v, idx, block_size: int, q_offset: int) -> bool:
    """Validate per-sequence tensors or [B, ...] batches (ValueError); True for a batch."""
    dims = (q.dim(), k.dim(), v.dim(), idx.dim())
    if dims == (3, 3, 3, 3):
        _check(q, k, v, idx, block_size, q_offset)
        return False
    if dims != (4, 4, 4, 4) or len({q.shape[0], k.shape[0], v.shape[0], idx.shape[0]}) != 1:
        raise ValueError("expected per-sequence q [N,T,H], k/v [K,S,H], idx [K,T,k] or the same "
                         f"with a leading batch dim; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(idx.shape)}")
    for b in range(q.shape[0]):
        _check(q[b], k[b], v[b], idx[b], block_size, q_offset)
    return True


def _batched(fn, q, k, v, idx, block_size, q_offset, *extra):
    """Run a per-sequence `fn` on [N,T,H]/[K,S,H]/[K,T,k] tensors or on [B, ...] batches."""
    batch = _check_all(q, k, v, idx, block_size, q_offset)
    if q.shape[-2] == 0:
        return q.new_zeros(q.shape)
    if not batch:
        return fn(q, k, v, idx, block_size, q_offset, *extra)
    return torch.stack([fn(q[b], k[b], v[b], idx[b], block_size, q_offset, *extra)
                        for b in range(q.shape[0])])
