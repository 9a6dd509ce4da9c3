"""Functional ops. Each op folder holds a pure-PyTorch reference and its dispatch (docs/kernels.md)."""

from __future__ import annotations

import torch


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will differentiate through an op on `tensors` (None ignored): the
    test every dispatch uses to keep inference-only kernels out of training."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
