"""Fused rotate-half RoPE for bf16 CPU inference (issue 5: decode overhead; spec §1.3).

`rotary(x_BTNH, cos_BTH, sin_BTH)` is `apply_rotary(x_BTNH.transpose(1, 2), cos, sin)
.transpose(1, 2)` (`model/layers.apply_rotary`, the reference and the definition): the
rotation computed in fp32 and rounded to bf16 once. It runs as one op of `csrc/rotary.cpp`
(bit-identical to the reference: same products, same sum, no FMA) when it applies: CPU, x
bfloat16, cos / sin float32, no autograd, the extension built (`MINICPM4_CPU_EXT=0` or
`FUSED_ROTARY = False` turn it off); otherwise the caller runs the reference (this layer
does not import the model's).
Shape legend: B rows, T tokens, N heads, H head dim.
"""

from __future__ import annotations

import torch

from minicpm4.kernels import cpu_ext

FUSED_ROTARY = True
"""Module switch (tests and benchmarks compare with the reference)."""

_EXT = "rotary"


def applies(x_BTNH: torch.Tensor, cos_BTH: torch.Tensor) -> bool:
    return FUSED_ROTARY and x_BTNH.dtype == torch.bfloat16 and \
        cos_BTH.dtype == torch.float32 and cpu_ext.inference_op(_EXT, x_BTNH, cos_BTH)


def rotary(x_BTNH: torch.Tensor, cos_BTH: torch.Tensor, sin_BTH: torch.Tensor) -> torch.Tensor:
    """RoPE of x [B, T, N, H] -> [B, T, N, H] by the C++ op (call `applies` first; where it
    does not apply, the caller runs `model/layers.apply_rotary`, as `Attention.attend` does)."""
    return torch.ops.minicpm4_rotary.rotary(x_BTNH, cos_BTH, sin_BTH)
