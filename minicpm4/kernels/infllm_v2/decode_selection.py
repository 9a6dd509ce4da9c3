"""InfLLM v2 selection for one-token decode steps (spec §2.3): the growing compressed-key
buffer and the selection of one new token against it.

`CompressedKeyBuffer` holds Kc1/Kc2 of the key stream so far (a new Kc1 every kernel_stride
tokens, a new Kc2 every coarse_stride); `select_blocks_decode` equals the last row of
`selection.select_blocks` on the whole sequence; `check_decode` is the argument check shared
with the C++ decode selection (`select_cpp.select_decode_fast`). Rules: docs/infllm_v2_selection.md.
Shape legend: N query heads, K kv heads, H head dim, C compressed keys, L tail keys, k ids.
"""

from __future__ import annotations

import torch

from minicpm4.kernels.infllm_v2.params import SparseParams
from minicpm4.kernels.infllm_v2.selection import (_check_lse, _check_q_kc, _select_compressed,
                                                  compress_keys)


class CompressedKeyBuffer:
    """Compressed keys of a growing key stream, for decode (spec §2.3).

    Holds Kc1/Kc2 so far plus the not-yet-compressed tails (keys from position
    kernel_stride * C1, resp. coarse_stride * C2, on). `append` emits a new Kc1 every
    kernel_stride tokens once kernel_size keys exist (Kc2: coarse_stride / coarse_kernel), so
    after any sequence of appends kc1_KCH/kc2_KCH equal `compress_keys` of the whole stream.
    Feed it the keys selection uses: pre-RoPE keys when params.use_nope.
    """

    def __init__(self, params: SparseParams) -> None:
        self.params = params
        self.num_tokens = 0
        self.kc1_KCH: torch.Tensor | None = None
        self.kc2_KCH: torch.Tensor | None = None
        self._tail1_KLH: torch.Tensor | None = None
        self._tail2_KLH: torch.Tensor | None = None

    @classmethod
    def from_keys(cls, k_KSH: torch.Tensor, params: SparseParams) -> CompressedKeyBuffer:
        """Buffer after a prefill of k_KSH."""
        buf = cls(params)
        buf.append(k_KSH)
        return buf

    @staticmethod
    def _emit(tail_KLH, new_KLH, kernel, stride):
        tail_KLH = torch.cat([tail_KLH, new_KLH], dim=1)
        kc_KCH = compress_keys(tail_KLH, kernel, stride)
        return tail_KLH[:, kc_KCH.shape[1] * stride:].clone(), kc_KCH

    def append(self, k_KTH: torch.Tensor) -> None:
        """Add T new keys [K, T, H] (T >= 0) to the stream."""
        if k_KTH.dim() != 3:
            raise ValueError(f"k_KTH must be [K, T, H], got shape {tuple(k_KTH.shape)}")
        k_KTH = k_KTH.detach()
        if self.kc1_KCH is None:
            empty = k_KTH[:, :0]
            self.kc1_KCH = self.kc2_KCH = self._tail1_KLH = self._tail2_KLH = empty
        elif (k_KTH.shape[0], k_KTH.shape[2]) != (self.kc1_KCH.shape[0], self.kc1_KCH.shape[2]):
            raise ValueError(f"k_KTH shape {tuple(k_KTH.shape)} does not match the buffer's "
                             f"[K={self.kc1_KCH.shape[0]}, *, H={self.kc1_KCH.shape[2]}]")
        p = self.params
        self._tail1_KLH, new1 = self._emit(self._tail1_KLH, k_KTH, p.kernel_size, p.kernel_stride)
        self._tail2_KLH, new2 = self._emit(self._tail2_KLH, k_KTH, p.coarse_kernel,
                                           p.coarse_stride)
        self.kc1_KCH = torch.cat([self.kc1_KCH, new1], dim=1)
        self.kc2_KCH = torch.cat([self.kc2_KCH, new2], dim=1)
        self.num_tokens += k_KTH.shape[1]


def check_decode(q_NH: torch.Tensor, buffer: CompressedKeyBuffer, *, cache_len: int,
                 params: SparseParams, lse: str) -> None:
    """ValueError unless q [N, H], params, LSE mode and buffer fit a decode step at cache_len."""
    _check_lse(lse)
    if q_NH.dim() != 2:
        raise ValueError(f"q_NH must be [N, H], got shape {tuple(q_NH.shape)}")
    if params != buffer.params:
        raise ValueError(f"params {params} differ from the buffer's {buffer.params}")
    if buffer.kc1_KCH is None or buffer.num_tokens != cache_len + 1:
        raise ValueError(f"buffer holds {buffer.num_tokens} keys; decoding position "
                         f"cache_len={cache_len} needs cache_len + 1 = {cache_len + 1}")
    _check_q_kc(q_NH[:, None], buffer.kc1_KCH, "q_NH", "buffer.kc1_KCH")


def select_blocks_decode(q_NH: torch.Tensor, buffer: CompressedKeyBuffer, *, cache_len: int,
                         params: SparseParams, lse: str = "exact") -> torch.Tensor:
    """Selection for one new token at position cache_len, int32 [K, 1, k] (spec §2.3).

    `buffer` must already hold the new token's key (cache_len + 1 keys). Every complete
    compressed key is visible (its kernel ends at or before the current position), so this
    equals the last row of `select_blocks` on the whole sequence.
    """
    check_decode(q_NH, buffer, cache_len=cache_len, params=params, lse=lse)
    with torch.no_grad():
        return _select_compressed(q_NH[:, None], buffer.kc1_KCH,
                                  buffer.kc2_KCH if lse == "approx" else None,
                                  q_offset=cache_len,
                                  num_blocks=-(-(cache_len + 1) // params.block_size),
                                  params=params, lse=lse)
