"""The pre-training loop: setup, steps, eval cadence, metrics log, checkpoint cadence, resume
(architecture §3 `train/loop.py`, ≤ 300 lines; anchors Part B §2: nanoGPT's loop shape,
torchtitan's `parallelize` order, DDP / FSDP2 under torchrun with gloo on CPU).

`train(cfg)` is the one entry point for 1 CPU process, several gloo processes under torchrun
and GPUs. Determinism: every RNG is seeded from `cfg.seed`, `torch.use_deterministic_algorithms`
is on, the data order is a pure function of (seed, epoch, step) and a resumed run restores the
optimizer, schedule, loader position and RNG states, so an interrupted-and-resumed run gives
the same loss sequence, bit for bit in fp32, as an uninterrupted one (tests/train/test_loop.py).

Outputs in ``cfg.run_dir``: ``config.json`` (the resolved `TrainConfig`), ``metrics.jsonl``
(one JSON object per step, ``{"kind": "train", ...}`` or ``{"kind": "eval", ...}``; on resume
the records past the checkpoint are dropped first) and ``checkpoints/`` (`train/checkpoint.py`).
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from minicpm4.data.loader import TokenLoader
from minicpm4.model.config import ModelConfig
from minicpm4.model.hf import load_config
from minicpm4.model.mup import config_for, init_model_
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.train import checkpoint as ckpt
from minicpm4.train.optim import build_optimizer
from minicpm4.train.recipe import TrainConfig
from minicpm4.train.schedule import WSDSchedule
from minicpm4.train.step import evaluate, train_step
from minicpm4.utils import dist

METRICS_FILE, CONFIG_FILE = "metrics.jsonl", "config.json"


@dataclass
class RunResult:
    """What `train` returns: the records it logged this call and where it stopped."""

    records: list[dict[str, Any]] = field(default_factory=list)
    start_step: int = 0
    """Optimizer steps already done when this call began (> 0 after a resume)."""
    end_step: int = 0
    """Optimizer steps done when it returned."""
    checkpoint: Path | None = None
    """The last checkpoint written by this call (rank 0)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())


def build_model(cfg: TrainConfig, device: torch.device) -> MiniCPM4ForCausalLM:
    """Fresh μP/SP-initialised model (seed `cfg.seed`), or `cfg.init_from`'s weights; fp32.

    With `init_from` the architecture is `cfg.model`, which may differ from the folder's
    config.json in what carries no weights (e.g. `--context` / `--sparse`: continued training
    at long context with InfLLM v2, spec §2.3); a shape mismatch is a named error."""
    if cfg.init_from:
        model = MiniCPM4ForCausalLM.from_pretrained(cfg.init_from, dtype="float32",
                                                    config=cfg.model)
    else:
        model = MiniCPM4ForCausalLM(config_for(cfg.model, cfg.parametrization))
        init_model_(model, cfg.parametrization, seed=cfg.seed,
                    embeddings_as_matrices=cfg.optim.embeddings_as_matrices)
    return model.to(device).train()


def _strategy(cfg: TrainConfig) -> str:
    if cfg.distributed == "auto":
        return "ddp" if dist.is_distributed() else "none"
    return cfg.distributed


def _micro_batches(loader: TokenLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def _eval_batches(cfg: TrainConfig) -> Iterator[dict[str, torch.Tensor]]:
    loader = TokenLoader(cfg.eval_data, cfg.seq_len, cfg.batch_size, rank=dist.rank(),
                         world_size=dist.world_size(), seed=cfg.seed, shuffle=False)
    return (next(loader) for _ in range(min(cfg.eval_batches, loader.steps_per_epoch)))


def _truncate_log(path: Path, start_step: int) -> None:
    """Keep only the records of steps < start_step (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", -1) < start_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


def _write_config(cfg: TrainConfig, run_dir: Path) -> None:
    tmp = run_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(cfg.to_json(), encoding="utf-8")
    os.replace(tmp, run_dir / CONFIG_FILE)


def _progress(rec: dict[str, Any], total: int) -> str:
    tok_s = rec["num_tokens"] / max(rec["seconds"], 1e-9)
    return (f"step {rec['step'] + 1}/{total} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
            f"grad {rec['grad_norm']:.3f} | {tok_s:,.0f} tok/s | {rec['seconds']:.2f}s")


def _due(step_done: int, interval: int, total: int) -> bool:
    return step_done == total or (interval > 0 and step_done % interval == 0)


def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None,
          log: Callable[[str], None] | None = None) -> RunResult:
    """Run (or continue) the pre-training run `cfg` (see `_train`); the process-wide
    deterministic-algorithms flag is restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, resume=resume, stop_after=stop_after, log=log)
    finally:
        torch.use_deterministic_algorithms(before)


def _train(cfg: TrainConfig, *, resume: bool, stop_after: int | None,
           log: Callable[[str], None] | None) -> RunResult:
    """The body of `train`.

    Args:
        resume: continue from `checkpoint.latest(cfg.run_dir)` (a fresh start if there is
            none). Without it, a run folder that already holds checkpoints is refused.
        stop_after: return after this many optimizer steps of this call, as if the job were
            interrupted (tests); checkpoints still follow `cfg.checkpoint_interval`.
        log: progress sink on rank 0 (default: print to stderr).
    """
    info = dist.init_distributed(cfg.device)
    say = (log or (lambda line: print(line, file=sys.stderr, flush=True))) if info.is_main \
        else (lambda line: None)
    run_dir = Path(cfg.run_dir)
    found = ckpt.latest(run_dir)
    if found is not None and not resume:
        raise ValueError(f"{run_dir} already holds checkpoints (newest {found.name}); pass "
                         f"--resume to continue it or choose a new run folder")
    strategy = _strategy(cfg)
    if strategy != "none" and not torch.distributed.is_initialized():
        raise ValueError(f"distributed {strategy!r} needs torchrun (not launched by it)")
    if strategy == "none" and info.world_size > 1:
        raise ValueError(f"distributed 'none' with {info.world_size} ranks would train "
                         f"{info.world_size} unsynchronised copies; use ddp or fsdp")
    seed_everything(cfg.seed)
    model = build_model(cfg, info.device)
    if found is not None:
        try:
            model.load_state_dict(ckpt.load_model_state(found))
        except RuntimeError as exc:
            raise ValueError(f"{found} does not fit this run's model config: {exc}") from exc
        model.tie_weights()
    wrapped = dist.wrap_model(model, strategy, blocks=list(model.model.layers),
                              device=info.device)
    optimizer = build_optimizer(model, cfg.optim)  # DDP: same params; FSDP2: sharded in place
    schedule = WSDSchedule(cfg.schedule, cfg.optim.lr)
    loader = TokenLoader(cfg.data, cfg.seq_len, cfg.batch_size, rank=info.rank,
                         world_size=info.world_size, seed=cfg.seed, shuffle=True)
    start = 0
    if found is not None:
        start = ckpt.resume_state(found, model=wrapped, optimizer=optimizer, schedule=schedule,
                                  loader=loader)
        say(f"resumed from {found} at step {start}")
    metrics_path = run_dir / METRICS_FILE
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(cfg, run_dir)
        _truncate_log(metrics_path, start)
    dist.barrier()
    result = RunResult(start_step=start, end_step=start)
    total = cfg.total_steps
    end = total if stop_after is None else min(total, start + stop_after)
    with open(metrics_path, "a", encoding="utf-8") if info.is_main else _Null() as out:
        for step in range(start, end):
            metrics = train_step(wrapped, optimizer, schedule,
                                 _micro_batches(loader, cfg.grad_accum), step=step,
                                 device=info.device, dtype=cfg.dtype,
                                 grad_clip=cfg.optim.grad_clip, mtp_lambda=cfg.mtp_lambda)
            rec = {"kind": "train", **metrics.to_dict()}
            _emit(out, rec, result)
            done = step + 1
            if done % cfg.log_interval == 0 or done == total:
                say(_progress(rec, total))
            if cfg.eval_data and _due(done, cfg.eval_interval, total):
                ev = evaluate(wrapped, _eval_batches(cfg), device=info.device, dtype=cfg.dtype)
                _emit(out, {"kind": "eval", "step": step, **ev}, result)
                say(f"eval @ step {done} | loss {ev['loss']:.4f} | ppl {ev['perplexity']:.2f}")
            if _due(done, cfg.checkpoint_interval, total):
                result.checkpoint = ckpt.save_checkpoint(
                    run_dir, step=done, model=wrapped, optimizer=optimizer, schedule=schedule,
                    loader=loader, train_config=cfg, keep=cfg.keep_checkpoints)
                if result.checkpoint is not None:
                    say(f"checkpoint {result.checkpoint}")
            result.end_step = done
    return result


class _Null:
    """A do-nothing file for ranks that do not write the log."""

    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, text: str) -> None:
        return None

    def flush(self) -> None:
        return None


def _emit(out: Any, rec: dict[str, Any], result: RunResult) -> None:
    out.write(json.dumps(rec) + "\n")
    out.flush()
    result.records.append(rec)


def evaluate_folder(model_dir: str | Path, data: str | Path, *, seq_len: int = 256,
                    batch_size: int = 8, batches: int | None = None, device: str = "cpu",
                    dtype: str = "float32",
                    adjust_config: Callable[[ModelConfig], ModelConfig] | None = None
                    ) -> dict[str, float]:
    """Held-out loss / perplexity of an HF model folder (or a training checkpoint folder) on
    a token-shard folder, over its windows in stream order (all of them by default).
    `adjust_config` maps the folder's config before loading (`--context`, `--sparse`)."""
    folder = ckpt.model_folder(model_dir)
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    cfg = load_config(folder)
    model = MiniCPM4ForCausalLM.from_pretrained(
        folder, dtype="float32", device=device,
        config=adjust_config(cfg) if adjust_config is not None else cfg)
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    loader = TokenLoader(data, seq_len, batch_size, shuffle=False)
    n = loader.steps_per_epoch if batches is None else batches
    if n < 1:
        raise ValueError(f"batches must be >= 1, got {n}")
    n = min(n, loader.steps_per_epoch)
    out = evaluate(model, (next(loader) for _ in range(n)), device=torch.device(device),
                   dtype=dtype)
    return {**out, "num_batches": n}
