"""Warmup-Stable-Decay learning-rate schedule (spec minicpm4-system.md §5.1; anchors Part B §1.5).

MiniCPM-1's WSD: linear warmup to η, a long constant stage, then a short decay η·f(s − T)
that MiniCPM made exponential; ~10% of the run in decay is enough (§5.1). The factor is a pure
function of the 0-based optimizer step `s` about to be taken (the convention of HF
`get_wsd_schedule`): with W warmup steps, N total steps and D = round(decay_fraction·N),

    s < W         : s / W                      (0 at step 0: Adam's moments are primed first)
    W <= s < N−D  : 1
    N−D <= s      : f(p), p = min(1, (s − (N−D)) / D), f(0) = 1, f(1) = min_lr_ratio r
                    exponential r**p · linear 1 − (1−r)p · cosine r + (1−r)(1 + cos πp)/2

so the last step of the run (N−1) is one decay step short of r and any step >= N gets r.
`apply` sets each optimizer group's lr to base_lr · group["lr_mult"] · factor, so μP's
per-group multipliers (`train/optim.py`) survive the schedule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from minicpm4.train.config import ScheduleConfig


class WSDSchedule:
    """WSD LR factors for `cfg`, peak LR `base_lr`; `state_dict` makes resume exact."""

    def __init__(self, cfg: ScheduleConfig, base_lr: float) -> None:
        if not isinstance(cfg, ScheduleConfig):
            raise ValueError(f"cfg: expected a ScheduleConfig, got {type(cfg).__name__}")
        if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) \
                or not math.isfinite(base_lr) or base_lr <= 0:
            raise ValueError(f"base_lr: must be a positive finite number, got {base_lr!r}")
        self.cfg = cfg
        self.base_lr = float(base_lr)
        self.last_step: int | None = None
        """The step of the latest `apply`, None before the first."""

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak LR at 0-based optimizer step `step` (module docstring)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: must be an integer >= 0, got {step!r}")
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return step / cfg.warmup_steps
        if cfg.decay_steps == 0 or step < cfg.decay_start:
            return 1.0
        p = min(1.0, (step - cfg.decay_start) / cfg.decay_steps)
        r = cfg.min_lr_ratio
        if cfg.decay_type == "exponential":
            return r ** p
        if cfg.decay_type == "linear":
            return 1.0 - (1.0 - r) * p
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))

    def lr(self, step: int) -> float:
        """The base (multiplier-1) learning rate at `step`: base_lr · lr_factor(step)."""
        return self.base_lr * self.lr_factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr to base_lr · lr_mult · factor for `step`; return the factor.

        Call it before `optimizer.step()` of that step. Groups without `lr_mult` use 1.
        """
        factor = self.lr_factor(step)
        for group in optimizer.param_groups:
            group["lr"] = self.base_lr * group.get("lr_mult", 1.0) * factor
        self.last_step = step
        return factor

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state: the config, base_lr and the last applied step."""
        return {"config": dataclasses.asdict(self.cfg), "base_lr": self.base_lr,
                "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly what `state_dict` saved (config included: a resumed run keeps the
        schedule it started with; build a new `WSDSchedule` to change the plan)."""
        missing = {"config", "base_lr", "last_step"} - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}")
        last = state["last_step"]
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise ValueError(f"state.last_step: must be None or an integer >= 0, got {last!r}")
        restored = WSDSchedule(ScheduleConfig(**state["config"]), state["base_lr"])
        self.cfg, self.base_lr, self.last_step = restored.cfg, restored.base_lr, last

    def __repr__(self) -> str:
        return f"WSDSchedule({self.cfg}, base_lr={self.base_lr}, last_step={self.last_step})"
