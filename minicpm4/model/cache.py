"""What the model needs from a KV cache (the `KVCache` protocol) and a contiguous implementation.

The model receives the cache explicitly in `forward(..., cache=...)`; there is no global state
(docs/architecture.md, "Model <-> cache"). `StaticKVCache` preallocates [B, K, S_max, H] per
layer, gpt-fast style, and is what `generate` and the tests use; the engine's paged cache
implements the same protocol. Shape legend: B batch, K kv heads, T new tokens, S cached
positions, H head dim.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class KVCache(Protocol):
    """Per-forward contract: `update` once per layer, then `advance` once per forward."""

    @property
    def seq_len(self) -> int:
        """Positions already stored (the same for every row; padding is tracked separately)."""

    @property
    def max_len(self) -> int:
        """Capacity in positions."""

    def key_valid(self) -> torch.Tensor | None:
        """[B, seq_len] bool, False where a stored position is padding; None if none is."""

    def num_valid(self) -> torch.Tensor:
        """[B] long: non-padding positions stored per row (the next RoPE position)."""

    def update(self, layer_idx: int, k_BKTH: torch.Tensor,
               v_BKTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys/values for a layer; return all keys/values [B, K, S+T, H]."""

    def advance(self, valid_BT: torch.Tensor | None, num_tokens: int) -> None:
        """Commit `num_tokens` new positions (with their padding flags) after all layers ran."""


class StaticKVCache:
    """Contiguous preallocated cache for a fixed batch; rows share one write offset."""

    def __init__(self, *, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._len = 0
        self._max_len = max_len
        self._valid_BS = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self._has_padding = False
        self._num_valid_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._layer_state: dict[int, Any] = {}

    @classmethod
    def for_model(cls, cfg, *, batch_size: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> StaticKVCache:
        return cls(num_layers=cfg.num_hidden_layers, batch_size=batch_size, max_len=max_len,
                   num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim_, dtype=dtype,
                   device=device)

    @property
    def seq_len(self) -> int:
        return self._len

    @property
    def batch_size(self) -> int:
        return self._valid_BS.shape[0]

    @property
    def max_len(self) -> int:
        return self._max_len

    def key_valid(self) -> torch.Tensor | None:
        return self._valid_BS[:, :self._len] if self._has_padding else None

    def num_valid(self) -> torch.Tensor:
        return self._num_valid_B

    def full_key_valid(self, *, upto: int) -> torch.Tensor:
        """[B, max_len] bool over the whole capacity: stored non-padding positions below
        `upto` (for static-shape decode steps that attend over the full buffer)."""
        in_range_S = torch.arange(self._max_len, device=self._valid_BS.device) < upto
        return self._valid_BS & in_range_S

    def update(self, layer_idx: int, k_BKTH: torch.Tensor,
               v_BKTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self._len, self._len + k_BKTH.shape[2]
        if end > self._max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self._max_len}")
        self.k[layer_idx][:, :, start:end] = k_BKTH
        self.v[layer_idx][:, :, start:end] = v_BKTH
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def advance(self, valid_BT: torch.Tensor | None, num_tokens: int) -> None:
        end = self._len + num_tokens
        if end > self._max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self._max_len}")
        if valid_BT is None:
            self._num_valid_B += num_tokens
        else:
            self._valid_BS[:, self._len:end] = valid_BT
            self._has_padding = self._has_padding or not bool(valid_BT.all())
            self._num_valid_B += valid_BT.sum(dim=1)
        self._len = end

    def sparse_state(self, layer_idx: int, factory: Callable[[], Any]) -> Any:
        """The per-layer InfLLM v2 decode state (compressed-key buffers, one per row), made by
        `factory` on first use; `reorder` keeps it in step with the rows."""
        if layer_idx not in self._layer_state:
            self._layer_state[layer_idx] = factory()
        return self._layer_state[layer_idx]

    def reorder(self, rows_B: torch.Tensor) -> None:
        """Keep only / permute batch rows (used when finished sequences leave the batch)."""
        keep = rows_B.tolist()
        for state in self._layer_state.values():
            if state.buffers:
                state.buffers = [state.buffers[i] for i in keep]
        self.k = [k.index_select(0, rows_B) for k in self.k]
        self.v = [v.index_select(0, rows_B) for v in self.v]
        self._valid_BS = self._valid_BS.index_select(0, rows_B)
        self._num_valid_B = self._num_valid_B.index_select(0, rows_B)
