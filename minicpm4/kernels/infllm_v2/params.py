"""InfLLM v2 hyper-parameters as seen by the kernels (spec §2.1).

`SparseParams` mirrors the model's `SparseConfig` (`sparse_config` in config.json) but lives in
`kernels/`, which may not import `minicpm4.model`; `SparseParams.from_config` copies the fields
from any object (or mapping) that has them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _fail(name: str, msg: str) -> None:
    raise ValueError(f"config field 'sparse_config.{name}': {msg}")


@dataclass(frozen=True)
class SparseParams:
    """Block-selection settings; defaults are the MiniCPM4 ones (spec §2.1)."""

    kernel_size: int = 32
    """Tokens per mean-pooled semantic kernel (compressed key Kc1)."""
    kernel_stride: int = 16
    """Stride between semantic kernels."""
    block_size: int = 64
    """KV block granularity of selection and sparse attention."""
    init_blocks: int = 1
    """Leading blocks always selected (attention sink)."""
    window_size: int = 2048
    """Local window; `local_blocks = window_size // block_size` previous blocks are forced."""
    topk: int = 64
    """Blocks chosen by score on top of the local ones (the top-k budget is topk + local)."""
    use_nope: bool = False
    """Select with pre-RoPE q/k (attention itself still uses the RoPE'd q/k)."""
    dense_len: int = 8192
    """Below this kv length attention is dense; -1 means always sparse (used by callers)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = bool if f.name == "use_nope" else int
            if type(value) is not want:  # bool is an int subclass: reject it for int fields
                _fail(f.name, f"must be {want.__name__}, got {value!r}")
        for name in ("kernel_size", "kernel_stride", "block_size", "window_size", "topk"):
            if getattr(self, name) <= 0:
                _fail(name, f"must be positive, got {getattr(self, name)}")
        if self.init_blocks < 0:
            _fail("init_blocks", f"must be >= 0, got {self.init_blocks}")
        if self.block_size % self.kernel_stride:
            _fail("block_size", f"must be a multiple of kernel_stride ({self.kernel_stride}), "
                                f"got {self.block_size}")
        if self.topk < self.init_blocks + 1:
            # Forced blocks (sink + local window + current) must fit in topk + local_blocks,
            # otherwise top-k would have to choose among +inf ties.
            _fail("topk", f"must be >= init_blocks + 1 = {self.init_blocks + 1} so the forced "
                          f"blocks fit the budget, got {self.topk}")
        if self.dense_len < -1:
            _fail("dense_len", f"must be -1 or >= 0, got {self.dense_len}")

    @property
    def local_blocks(self) -> int:
        """Previous blocks forced by the local window (32 by default)."""
        return self.window_size // self.block_size

    @property
    def num_selected(self) -> int:
        """Top-k width: topk + local_blocks (96 by default); forced blocks count against it."""
        return self.topk + self.local_blocks

    @property
    def coarse_kernel(self) -> int:
        """Kernel of the coarse keys Kc2 used by the LSE approximation (128 by default)."""
        return 4 * self.kernel_size

    @property
    def coarse_stride(self) -> int:
        """Stride of the coarse keys Kc2 (64 by default)."""
        return 4 * self.kernel_stride

    @property
    def pool_stride(self) -> int:
        """Compressed keys per block; the block max-pool uses kernel pool_stride+1, padding 1."""
        return self.block_size // self.kernel_stride

    def replace(self, **changes: Any) -> SparseParams:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, obj: Any) -> SparseParams:
        """Build from any object with these attribute names (e.g. the model's SparseConfig) or
        a mapping (e.g. the `sparse_config` JSON dict); missing fields keep their defaults."""
        get = obj.get if isinstance(obj, Mapping) else (lambda n, d: getattr(obj, n, d))
        kw = {f.name: get(f.name, f.default) for f in dataclasses.fields(cls)}
        return cls(**kw)
