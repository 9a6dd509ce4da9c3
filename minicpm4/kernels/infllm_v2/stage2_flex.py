"""The compiled flex_attention backend of InfLLM v2 stage 2 (spec §2.2 step 6): a `BlockMask`
built directly from the per-token block selection (see `stage2.py`'s module docstring for the
backend; `sparse_attention_flex` below is the entry point and does the checks).

Shape legend: B batch, K kv heads, N query heads, T queries, S keys, Q query blocks, R rows per
query block, b / nb key blocks.
"""

from __future__ import annotations

import torch

from minicpm4.kernels import needs_grad
from minicpm4.kernels.infllm_v2.stage2_common import _check_all, _selection

_FLEX: dict = {}  # the compiled flex_attention; torch.compile keeps one graph per shape


def compiled_flex():
    if not _FLEX:  # dynamic=True fails here: inductor's CPU flex template emits invalid C++
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _flex_mask_mod(sel_BKTb: torch.Tensor, offset: torch.Tensor, G: int, bs: int):
    # One code object for every call: dynamo guards on the code and lifts the captured
    # tensors as graph inputs, so a new selection does not recompile.
    def mask_mod(b, h, q_idx, kv_idx):
        return sel_BKTb[b, h // G, q_idx, kv_idx // bs] & (kv_idx <= q_idx + offset)
    return mask_mod


def flex_block_mask(sel_BKTb, N: int, T: int, S: int, bs: int, q_offset: int, backward: bool):
    """BlockMask from the per-token selection. A query block's partial KV blocks are the union
    of its rows' blocks. Full blocks (selected by every row and wholly in the past) skip the
    mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask
    B, K, Tp, nb = sel_BKTb.shape
    Qf, dev = Tp // bs, sel_BKTb.device
    rows_BKQRb = sel_BKTb.view(B, K, Qf, bs, nb)
    pad_QR1 = (torch.arange(Tp, device=dev) >= T).view(Qf, bs, 1)
    first_Q1 = q_offset + torch.arange(Qf, device=dev)[:, None] * bs
    past_Qb = (torch.arange(nb, device=dev) + 1) * bs - 1 <= first_Q1
    full_BKQb = (rows_BKQRb | pad_QR1).all(dim=3) & past_Qb
    part_BKQb = rows_BKQRb.any(dim=3) & ~full_BKQb

    def to_kv(m_BKQb):
        num = m_BKQb.sum(dim=-1).to(torch.int32).repeat_interleave(N // K, dim=1)
        ind = torch.argsort((~m_BKQb).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num.contiguous(), ind.repeat_interleave(N // K, dim=1).contiguous()

    (pn, pi), (fn, fi) = to_kv(part_BKQb), to_kv(full_BKQb)
    offset = torch.tensor(q_offset, dtype=torch.int64, device=dev)
    return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=bs,
                                    mask_mod=_flex_mask_mod(sel_BKTb, offset, N // K, bs),
                                    seq_lengths=(T, S), compute_q_blocks=backward)


def sparse_attention_flex(q_NTH, k_KSH, v_KSH, idx_KTk, *, block_size: int,
                          q_offset: int = 0) -> torch.Tensor:
    """Compiled flex_attention with a BlockMask built from the indices (forward only on CPU).

    The first call per shape compiles (seconds). Batches go through in one call.
    """
    batch = _check_all(q_NTH, k_KSH, v_KSH, idx_KTk, block_size, q_offset)
    if q_NTH.shape[-2] == 0:
        return q_NTH.new_zeros(q_NTH.shape)
    q, k, v, idx = (t if batch else t[None] for t in (q_NTH, k_KSH, v_KSH, idx_KTk))
    (N, T), (K, S) = q.shape[1:3], k.shape[1:3]
    nb, Qf = -(-S // block_size), -(-T // block_size)
    sel_BKTb = torch.stack([_selection(i, nb, block_size, q_offset) for i in idx])
    sel_BKTb = torch.nn.functional.pad(sel_BKTb, (0, 0, 0, Qf * block_size - T)).contiguous()
    bm = flex_block_mask(sel_BKTb, N, T, S, block_size, q_offset, needs_grad(q, k, v))
    out = compiled_flex()(q, k, v, block_mask=bm, enable_gqa=N != K)
    return out if batch else out[0]
