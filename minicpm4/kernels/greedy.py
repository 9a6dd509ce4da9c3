"""Greedy token choice for a batch of logits rows (issue 5: sampling cost per decode step).

`argmax_rows(logits_BV)` is `logits_BV.float().max(dim=-1).indices` (the reference and the
definition: first index of each row's maximum, NaN counting as the maximum), computed by
`csrc/greedy.cpp` in the logits' own dtype (bf16 or fp32) when it applies: CPU, no
autograd, the extension built (`MINICPM4_CPU_EXT=0` or `GREEDY_OP = False` turn it off).
Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

import torch

from minicpm4.kernels import cpu_ext

GREEDY_OP = True
"""Module switch (tests compare with the reference)."""

_EXT = "greedy"


def applies(logits_BV: torch.Tensor) -> bool:
    return GREEDY_OP and logits_BV.dim() == 2 and logits_BV.shape[1] > 0 and \
        logits_BV.dtype in (torch.bfloat16, torch.float32) and \
        cpu_ext.inference_op(_EXT, logits_BV)


def argmax_rows(logits_BV: torch.Tensor) -> torch.Tensor:
    """int64 [B]: the first index of each row's maximum."""
    if applies(logits_BV):
        return torch.ops.minicpm4_greedy.argmax_rows(logits_BV)
    return logits_BV.float().max(dim=-1).indices
