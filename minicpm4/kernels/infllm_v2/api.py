"""InfLLM v2 attention for one layer: the dense <-> sparse switch, selection, stage 2 (spec §2.2,
§2.3; issue 4).

`infllm_v2_attention` is what the model's attention layer calls when its config carries
`sparse_config`. Per batch row it decides dense or sparse from the row's key count
(``kv_len >= dense_len``, or always with ``dense_len == -1``), selects blocks
(`select_cpp.select_blocks_fast` for a prefill chunk; `select_cpp.select_decode_fast` with
the row's `CompressedKeyBuffer` for a one-token step: the fused C++ kernels on CPU when they
are built, else `selection.select_blocks_chunked` / `select_blocks_decode`) and runs stage 2
(`stage2.sparse_attention`). Rows may start with left padding: row b's real keys are
``k[b, :, key_start[b]:]``; its real new queries are the last ``min(T, S - key_start[b])``
(their outputs at padding queries are zeros).

Shape legend: B batch, N query heads, K kv heads, T new tokens, S keys, H head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from minicpm4.kernels.attention import attention
from minicpm4.kernels.infllm_v2.params import SparseParams
from minicpm4.kernels.infllm_v2.select_cpp import select_blocks_fast, select_decode_fast
from minicpm4.kernels.infllm_v2.decode_selection import CompressedKeyBuffer
from minicpm4.kernels.infllm_v2.selection import LSE_MODES
from minicpm4.kernels.infllm_v2.stage2 import sparse_attention

@dataclass
class SparseLayerState:
    """Per-layer decode state kept in the KV cache: one compressed-key buffer per batch row
    (fed the keys selection uses; the pre-RoPE ones with `use_nope`)."""

    buffers: list[CompressedKeyBuffer] = field(default_factory=list)


def uses_sparse(params: SparseParams, kv_len: int) -> bool:
    """The dense_len switch of spec §2.1: sparse iff dense_len == -1 or kv_len >= dense_len."""
    return params.dense_len == -1 or kv_len >= params.dense_len


def _dense_row(q_NTH, k_KSH, v_KSH, q_offset: int) -> torch.Tensor:
    T, S = q_NTH.shape[1], k_KSH.shape[1]
    if q_offset == 0 and T == S:
        return attention(q_NTH[None], k_KSH[None], v_KSH[None], is_causal=True)[0]
    mask_TS = torch.arange(S, device=q_NTH.device)[None, :] <= \
        (q_offset + torch.arange(T, device=q_NTH.device))[:, None]
    return attention(q_NTH[None], k_KSH[None], v_KSH[None], mask_B1TS=mask_TS[None, None])[0]


def infllm_v2_attention(q_BNTH: torch.Tensor, k_BKSH: torch.Tensor, v_BKSH: torch.Tensor,
                        params: SparseParams, *, key_start: Sequence[int] | None = None,
                        state: SparseLayerState | None = None, lse: str = "approx",
                        q_sel_BNTH: torch.Tensor | None = None,
                        k_sel_new_BKTH: torch.Tensor | None = None,
                        k_sel_BKSH: torch.Tensor | None = None,
                        backend: str = "auto") -> torch.Tensor:
    """Causal InfLLM v2 attention of T new queries over S keys (the last T are theirs).

    Args:
        key_start: per row, the first real (non-padding) key position (default all 0).
        state: decode state of this layer (from the cache); its buffers are created at the
            first call and fed the new keys of every call. Without it a one-token step
            selects from the full keys (same blocks, more work).
        lse: "approx" (coarse 128/64 keys, the CPM.cu default) or "exact".
        q_sel_BNTH, k_sel_BKSH, k_sel_new_BKTH: the q/k used for *selection* when they differ
            from the attended ones (`use_nope`: pre-RoPE copies); k_sel_new = the new tokens'.
    Returns:
        [B, N, T, H] in q's dtype. Rows below dense_len attend densely (identical to causal
        attention); gradients flow through stage 2 (selection is not differentiable).
    """
    if lse not in LSE_MODES:
        raise ValueError(f"lse must be one of {LSE_MODES}, got {lse!r}")
    if q_BNTH.dim() != 4 or k_BKSH.dim() != 4 or v_BKSH.shape != k_BKSH.shape:
        raise ValueError(f"expected q [B, N, T, H] and k/v [B, K, S, H], got "
                         f"{tuple(q_BNTH.shape)}, {tuple(k_BKSH.shape)}, {tuple(v_BKSH.shape)}")
    B, _, T, _ = q_BNTH.shape
    S = k_BKSH.shape[2]
    if T > S:
        raise ValueError(f"{T} new queries but only {S} keys")
    starts = [int(x) for x in key_start] if key_start is not None else [0] * B
    if len(starts) != B or any(not 0 <= x < S for x in starts):
        raise ValueError(f"key_start must give one position in [0, {S}) per row, got {starts}")
    q_sel = q_sel_BNTH if q_sel_BNTH is not None else q_BNTH
    k_sel = k_sel_BKSH if k_sel_BKSH is not None else k_BKSH
    k_new = k_sel_new_BKTH if k_sel_new_BKTH is not None else k_sel[:, :, S - T:]
    if state is not None and len(state.buffers) != B:
        if state.buffers:
            raise ValueError(f"sparse decode state holds {len(state.buffers)} rows, the batch "
                             f"has {B}")
        state.buffers = [CompressedKeyBuffer(params) for _ in range(B)]
    outs = []
    for b, start in enumerate(starts):
        kv_len = S - start
        real = min(T, kv_len)  # left-padded rows have fewer real new tokens
        q_NTH = q_BNTH[b, :, T - real:]
        k_KSH, v_KSH = k_BKSH[b, :, start:], v_BKSH[b, :, start:]
        if state is not None:
            buf = state.buffers[b]
            buf.append(k_sel[b, :, start:].detach() if buf.num_tokens == 0
                       else k_new[b, :, T - real:].detach())
            if buf.num_tokens != kv_len:
                raise ValueError(f"sparse decode state of row {b} holds {buf.num_tokens} keys, "
                                 f"the cache {kv_len}")
        if not uses_sparse(params, kv_len):
            out_NTH = _dense_row(q_NTH, k_KSH, v_KSH, kv_len - real)
        else:
            # Selection is not differentiable and runs in fp32 even under bf16 autocast
            # (its top-k orders the fp32 bit patterns of the scores).
            with torch.no_grad(), torch.autocast(q_BNTH.device.type, enabled=False):
                if real == 1 and state is not None:
                    idx_KTk = select_decode_fast(q_sel[b, :, T - 1], state.buffers[b],
                                                 cache_len=kv_len - 1, params=params, lse=lse)
                else:
                    idx_KTk = select_blocks_fast(q_sel[b, :, T - real:],
                                                 k_sel[b, :, start:], q_offset=kv_len - real,
                                                 params=params, lse=lse)
            out_NTH = sparse_attention(q_NTH, k_KSH, v_KSH, idx_KTk,
                                       block_size=params.block_size, q_offset=kv_len - real,
                                       backend=backend)
        if real < T:
            out_NTH = torch.cat([out_NTH.new_zeros(out_NTH.shape[0], T - real,
                                                   out_NTH.shape[2]), out_NTH], dim=1)
        outs.append(out_NTH)
    return torch.stack(outs)
