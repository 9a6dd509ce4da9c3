"""torch.distributed helpers: init from torchrun, rank/world, DDP / FSDP2 wrapping, full state
dicts (architecture §3 "`utils/dist.py`"; anchors Part B §2 recommendation: ride directly on
`torch.distributed`, backend ``"cpu:gloo,cuda:nccl"`` so one code path runs in CPU CI and on GPUs).

One process without torchrun env (no ``MASTER_ADDR`` / ``WORLD_SIZE``) is world 1 and never touches a process
group. Strategies: ``"none"`` (no wrapper), ``"ddp"`` (`DistributedDataParallel`, gradients
all-reduced and averaged over ranks) and ``"fsdp"`` (FSDP2 `fully_shard` on every decoder
block and then the root, on a 1-D `DeviceMesh`; gradients are reduce-scattered and averaged
over ranks, as DDP). Saving goes through `torch.distributed.checkpoint.state_dict`
(`get_model_state_dict` / `get_optimizer_state_dict` with ``full_state_dict=True``), whose
FQN-keyed format is the same for every strategy, so a run can resume under another one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from exc


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA).

    Args:
        device: "cpu", "cuda" or "auto" (CUDA when available). Under torchrun each rank uses
            ``cuda:LOCAL_RANK``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    launched = "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ  # torchrun, any size
    if launched and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if use_cuda else None)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor; `t` itself when world size is 1)."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, strategy: str, *, blocks: Iterable[nn.Module] = (),
               device: torch.device | None = None,
               forward_methods: Iterable[str] = ()) -> nn.Module:
    """Wrap `model` for data parallelism; the returned module is the one to call.

    Args:
        strategy: "none", "ddp" or "fsdp" (see the module docstring); "ddp" and "fsdp" need
            an initialised process group (world size 1 works too).
        blocks: the modules FSDP2 shards one by one before the root (the decoder layers).
        device: the ranks' device type for the FSDP mesh (default: the model's).
        forward_methods: other methods of `model` used as a forward (e.g. "forward_with_mtp");
            FSDP2 must gather the root's parameters around them too.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "none":
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"strategy {strategy!r} needs torch.distributed (launch with torchrun)")
    dev = device or next(model.parameters()).device
    if strategy == "ddp":
        ids = [dev.index] if dev.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 shards in place: the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter inside the block (gradient accumulation:
    every micro-batch but the last). A no-op for unwrapped models or when not `enabled`."""
    if not enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict with the user's names (collective under FSDP: every rank
    calls it). DDP's ``module.`` prefix is removed."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options())


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded, FQN-keyed CPU optimizer state (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                                   state: dict[str, Any]) -> None:
    """Inverse of `full_optimizer_state_dict` (every rank passes the full state)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state,
                             options=_options())


def load_full_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into a possibly wrapped/sharded model."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, state, options=_options(strict=True))
