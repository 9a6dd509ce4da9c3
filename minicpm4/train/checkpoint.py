"""Training checkpoints: crash-safe save, keep-last-K, `latest` and restore (architecture §3
`train/checkpoint.py`, §4 "every run writes its fully resolved config as JSON next to its
checkpoints"; anchors Part B §2: full state dicts through `torch.distributed.checkpoint.state_dict`
so DDP, FSDP2 and single-process runs share one format).

Layout of ``RUN_DIR/checkpoints/step-NNNNNNNN/`` (NNNNNNNN = optimizer steps completed)::

    model/              plain HF folder (config.json + model.safetensors, fp32): loads with
                        `MiniCPM4ForCausalLM.from_pretrained` / `minicpm4 generate --model`
    trainer.pt          {"format", "step", "optimizer" (FQN-keyed full state), "schedule",
                         "loader", "rng" (one entry per rank: torch, cuda, python, numpy)}
    train_config.json   the run's resolved `TrainConfig`

Crash safety. Everything is written into ``checkpoints/.tmp-step-NNNNNNNN-PID/``, fsynced, and
only then renamed to its final name (an atomic rename on POSIX); a checkpoint name therefore
always holds a complete checkpoint. Old checkpoints are pruned (rename to ``.trash-*`` then
delete) only after the new one is in place, so a SIGKILL at any moment leaves the previous
checkpoint intact; leftovers of a killed save are removed by the next save.

Test hook: ``MINICPM4_TEST_SAVE_PAUSE="STEP:SECONDS"`` sleeps inside the save of checkpoint
STEP after the model weights are in the temporary folder (lets a test SIGKILL mid-save).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.utils import dist

FORMAT = "minicpm4-train-checkpoint-v1"
CHECKPOINTS = "checkpoints"
MODEL_DIR, TRAINER_FILE, CONFIG_FILE = "model", "trainer.pt", "train_config.json"
_NAME = re.compile(r"^step-(\d{8})$")
PAUSE_ENV = "MINICPM4_TEST_SAVE_PAUSE"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, folder)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _NAME.match(path.name)
        if m and (path / TRAINER_FILE).is_file() and (path / MODEL_DIR / "config.json").is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def model_folder(path: str | Path) -> Path:
    """The HF model folder of a training checkpoint (its `model/`), or `path` itself when it
    is already a model folder; a run folder means its newest checkpoint."""
    folder = Path(path)
    if (folder / CHECKPOINTS).is_dir() and latest(folder) is not None:
        folder = latest(folder)
    if (folder / MODEL_DIR / "config.json").is_file():
        return folder / MODEL_DIR
    if (folder / "config.json").is_file():
        return folder
    raise ValueError(f"{folder} is neither a model folder (config.json) nor a training "
                     f"checkpoint or run folder")


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of `run_dir`, None if there is none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA if present, Python, NumPy)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pause_for_tests(step: int) -> None:
    raw = os.environ.get(PAUSE_ENV)
    if raw:
        at, _, seconds = raw.partition(":")
        if int(at) == step:
            time.sleep(float(seconds or 60))


def _clean_leftovers(root: Path) -> None:
    for path in root.iterdir():
        if path.name.startswith((".tmp-step-", ".trash-")):
            shutil.rmtree(path, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    found = list_checkpoints(root.parent)
    for _, path in found[:-keep] if keep < len(found) else []:
        trash = root / f".trash-{path.name}-{os.getpid()}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _write_model(state: dict[str, torch.Tensor], config: Any, folder: Path) -> None:
    with torch.device("meta"):
        shell = MiniCPM4ForCausalLM(config)
    shell.load_state_dict(state, strict=True, assign=True)
    shell.tie_weights()
    shell.save_pretrained(folder)


def save_checkpoint(run_dir: str | Path, *, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, schedule: Any, loader: Any,
                    train_config: Any, keep: int = 2) -> Path | None:
    """Write checkpoint `step` of the run (collective: every rank calls it).

    Args:
        model: the wrapped or plain model (its `.config` or its DDP module's is saved).
        schedule, loader: objects with `state_dict()` (WSDSchedule, TokenLoader).
        train_config: the run's `TrainConfig` (written as JSON).
        keep: how many newest checkpoints survive the pruning.
    Returns:
        the final folder on rank 0, None on other ranks.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    model_state = dist.full_model_state_dict(model)
    optim_state = dist.full_optimizer_state_dict(model, optimizer)
    rng = dist.gather_objects(capture_rng())
    final = None
    if dist.is_main():
        root = Path(run_dir) / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(root)
        final = root / checkpoint_name(step)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        _write_model(model_state, dist.unwrap(model).config, tmp / MODEL_DIR)
        _pause_for_tests(step)
        torch.save({"format": FORMAT, "step": step, "optimizer": optim_state,
                    "schedule": schedule.state_dict(), "loader": loader.state_dict(),
                    "rng": rng}, tmp / TRAINER_FILE)
        (tmp / CONFIG_FILE).write_text(train_config.to_json(), encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            trash = root / f".trash-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)
    dist.barrier()
    return final


def load_trainer_state(folder: str | Path) -> dict[str, Any]:
    """trainer.pt of a checkpoint folder (ValueError if absent or not ours)."""
    path = Path(folder) / TRAINER_FILE
    if not path.is_file():
        raise ValueError(f"{folder} is not a training checkpoint (no {TRAINER_FILE})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    return state


def load_model_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a checkpoint's model/ folder, as a state dict."""
    model = MiniCPM4ForCausalLM.from_pretrained(Path(folder) / MODEL_DIR, dtype="float32")
    return model.state_dict()


def resume_state(folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: Any, loader: Any) -> int:
    """Restore optimizer, schedule, loader and this rank's RNG from a checkpoint (the model's
    weights are loaded separately, before wrapping: `load_model_state`). Returns the step to
    continue from."""
    state = load_trainer_state(folder)
    dist.load_full_optimizer_state_dict(model, optimizer, state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    loader.load_state_dict(state["loader"])
    rngs = state["rng"]  # another world size (allowed by the loader) reuses rank 0's state
    restore_rng(rngs[dist.rank()] if dist.rank() < len(rngs) else rngs[0])
    return int(state["step"])


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """The resolved train config stored in a checkpoint (raw JSON)."""
    return json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
