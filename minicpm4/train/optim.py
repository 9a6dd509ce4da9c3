"""μP-aware AdamW parameter groups (spec minicpm4-system.md §1.1 item 4; anchors B §1.1-1.2).

Every parameter gets its role from `model.mup.param_role` and its LR multiplier from
`model.mup.lr_multiplier` (hidden matrices η/m under μP, everything else η). Each group carries
`lr_mult` so that the schedule (`train/schedule.py`) sets lr = base_lr · lr_mult · factor —
relative scaling, never an absolute LR, as mup's README warns for hand-written schedulers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minicpm4.model import mup
from minicpm4.model.config import ModelConfig
from minicpm4.train.config import OptimConfig

_FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")
"""Device types with a fused AdamW kernel in current torch."""


def _model_config(model: nn.Module) -> ModelConfig:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError("model: param_groups needs a model with a `.config` ModelConfig")
    return cfg


def _decays(role: str, optim_cfg: OptimConfig) -> bool:
    if role == "vector":
        return False
    if role == "embedding":
        return optim_cfg.decay_embeddings
    return True


def param_groups(model: nn.Module, optim_cfg: OptimConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups, one per role present in `model` (fixed order: embedding,
    matrix, vector, head), covering every trainable parameter exactly once (a tied head is the
    embedding tensor and appears once). Frozen parameters (requires_grad False) are left out.

    Each group: `params`, `param_names` (torch's key), `role`, `lr_mult`, `lr`
    (= optim_cfg.lr · lr_mult, the peak) and `weight_decay`.
    """
    cfg = _model_config(model)
    by_role: dict[str, tuple[list[str], list[nn.Parameter]]] = {r: ([], []) for r in mup.ROLES}
    for name, p in model.named_parameters():
        if p.requires_grad:
            names, params = by_role[mup.param_role(name, p)]
            names.append(name)
            params.append(p)
    groups = []
    for role, (names, params) in by_role.items():
        if not params:
            continue
        lr_mult = mup.lr_multiplier(cfg, role, optim_cfg.parametrization,
                                    embeddings_as_matrices=optim_cfg.embeddings_as_matrices)
        groups.append({
            "params": params, "param_names": names, "role": role, "lr_mult": lr_mult,
            "lr": optim_cfg.lr * lr_mult,
            "weight_decay": optim_cfg.weight_decay if _decays(role, optim_cfg) else 0.0,
        })
    if not groups:
        raise ValueError("model: has no trainable parameters")
    return groups


def _use_fused(groups: list[dict[str, Any]], optim_cfg: OptimConfig) -> bool:
    if optim_cfg.fused is not None:
        return optim_cfg.fused
    params = [p for g in groups for p in g["params"]]
    return all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params) \
        and len({p.device.type for p in params}) == 1


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> torch.optim.AdamW:
    """`torch.optim.AdamW` over `param_groups(model, optim_cfg)`, fused where available
    (CPU included), foreach otherwise. Group LRs start at the peak (factor 1); drive them with
    `WSDSchedule.apply` before every step."""
    groups = param_groups(model, optim_cfg)
    fused = _use_fused(groups, optim_cfg)
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=optim_cfg.betas,
                             eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay,
                             fused=fused or None, foreach=None if fused else True)
