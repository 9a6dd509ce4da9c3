"""One optimizer step and held-out evaluation (architecture §3 `train/step.py`; spec
minicpm4-system.md §5.1 WSD, §1.4 MTP; anchors Part B §2: nanoGPT's accumulation with
`no_sync`, torchtitan's global-token loss normalisation).

Loss normalisation. The loss of a step is the mean cross-entropy over every non-ignored target
(labels != -100) of the *global* batch: all ranks, all micro-batches. The global count N is
all-reduced before any backward; micro-batch i contributes ``sum_i(CE) * world / N`` to the
backward (DDP and FSDP2 average gradients over ranks, the ``world`` factor undoes that), so the
gradient equals the one of a single process holding the whole global batch, whatever the
split into ranks and micro-batches. The reported loss is ``all_reduce(sum CE) / N``.

With ``mtp_lambda`` > 0 the model must carry the MTP head (`model/mtp.py`): the step adds
lam x the MTP cross-entropy (target t+2 = ``labels[:, t+1]``, normalised by its own global
count), as `model.mtp.ntp_mtp_loss` defines the total.

The losses come from the model's `forward(labels_BT=..., mtp_labels_BT=...)`: the trunk with
the batch's packing positions and document mask (attention stays inside a document), then the
LM head fused with the cross-entropy (`kernels/linear_ce.py`, no [tokens, vocab] fp32 logits
kept for the backward).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from minicpm4.data.packing import IGNORE_INDEX
from minicpm4.train.schedule import WSDSchedule
from minicpm4.utils import dist

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step reports (floats are Python floats, global over ranks)."""

    step: int
    """0-based optimizer step just taken."""
    loss: float
    """Total loss (next-token mean CE, plus lam x MTP CE when MTP is on)."""
    lr: float
    """Base learning rate (multiplier 1) used for this step."""
    grad_norm: float
    """Global gradient L2 norm before clipping."""
    num_tokens: int
    """Input tokens processed by all ranks this step."""
    num_targets: int
    """Non-ignored next-token targets of the global batch (the loss denominator)."""
    seconds: float
    """Wall time of the step."""
    ntp_loss: float | None = None
    """Next-token part of the loss when MTP is on."""
    mtp_loss: float | None = None
    """MTP part (unweighted) when MTP is on."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``dtype == "bfloat16"`` (CPU or CUDA), nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _mtp_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    """MTP targets [B, T-1]: column t predicts token t+2 = labels[:, t+1]; the last column
    has no target in the window."""
    out = labels_BT[:, 1:].clone()
    out[:, -1] = IGNORE_INDEX
    return out


def _forward_sums(model: nn.Module, batch: Batch, *, device: torch.device, dtype: str,
                  mtp: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of next-token CE, sum of MTP CE or None) of one micro-batch, through the model's
    `forward(labels_BT=...)` (fused LM-head loss; DDP and FSDP2 hooks see it)."""
    ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    kw = {k + "_BT": batch[k].to(device) for k in ("positions", "doc_ids") if k in batch}
    with autocast(device, dtype):
        sums = model(ids, labels_BT=labels, mtp_labels_BT=_mtp_labels(labels) if mtp else None,
                     **kw)
    return sums.ntp, sums.mtp


def _count(batches: Sequence[Batch], mtp: bool) -> tuple[int, int]:
    ntp = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    if not mtp:
        return ntp, 0
    return ntp, sum(int((_mtp_labels(b["labels"]) != IGNORE_INDEX).sum()) for b in batches)


def _global(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum each value over ranks (float64 on the wire)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    return dist.all_reduce_sum(t).tolist()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: WSDSchedule,
               micro_batches: Sequence[Batch], *, step: int, device: torch.device,
               dtype: str = "float32", grad_clip: float | None = 1.0,
               mtp_lambda: float = 0.0) -> StepMetrics:
    """Forward/backward every micro-batch, clip, set the WSD learning rate and step.

    Args:
        model: the (possibly DDP/FSDP2-wrapped) model, in train mode.
        micro_batches: this rank's micro-batches (loader dicts, int64 [B, T]).
        step: 0-based optimizer step (drives the schedule).
        dtype: "float32" or "bfloat16" (autocast; master weights stay fp32).
        grad_clip: max global gradient norm, None for no clipping.
        mtp_lambda: MTP loss weight (module docstring); 0 = next-token only.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    start = time.perf_counter()
    mtp = mtp_lambda > 0
    world = dist.world_size()
    n_ntp, n_mtp = _count(micro_batches, mtp)
    n_ntp, n_mtp = (int(x) for x in _global([n_ntp, n_mtp], device))
    denom_ntp, denom_mtp = max(n_ntp, 1), max(n_mtp, 1)
    optimizer.zero_grad(set_to_none=True)
    sum_ntp = sum_mtp = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with dist.no_grad_sync(model, enabled=not last):
            ce, ce_mtp = _forward_sums(model, batch, device=device, dtype=dtype, mtp=mtp)
            loss = ce / denom_ntp
            if ce_mtp is not None:
                loss = loss + mtp_lambda * ce_mtp / denom_mtp
                sum_mtp += float(ce_mtp.detach())
            (loss * world).backward()
        sum_ntp += float(ce.detach())
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip is not None else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    factor = schedule.apply(optimizer, step)
    optimizer.step()
    sum_ntp, sum_mtp = _global([sum_ntp, sum_mtp], device)
    ntp_loss = sum_ntp / denom_ntp
    mtp_loss = sum_mtp / denom_mtp if mtp else None
    total = ntp_loss + mtp_lambda * mtp_loss if mtp else ntp_loss
    tokens = sum(int(b["input_ids"].numel()) for b in micro_batches) * world
    return StepMetrics(step=step, loss=total, lr=schedule.base_lr * factor,
                       grad_norm=float(norm), num_tokens=tokens, num_targets=n_ntp,
                       seconds=time.perf_counter() - start,
                       ntp_loss=ntp_loss if mtp else None, mtp_loss=mtp_loss)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[Batch] | Sequence[Batch], *,
             device: torch.device, dtype: str = "float32") -> dict[str, float]:
    """Held-out next-token loss over `batches` (this rank's share), global over ranks.

    Returns ``{"loss", "perplexity", "num_targets"}``: mean CE over every non-ignored target
    of every rank, exp of it, and the target count. Restores the model's train/eval mode.
    """
    was_training = model.training
    model.eval()
    total = count = 0.0
    try:
        for batch in batches:
            ce, _ = _forward_sums(model, batch, device=device, dtype=dtype, mtp=False)
            total += float(ce)
            count += int((batch["labels"] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    total, count = _global([total, count], device)
    if count == 0:
        raise ValueError("evaluation saw no target tokens")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "num_targets": int(count)}
