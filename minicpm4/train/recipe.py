"""`TrainConfig`: everything one pre-training run needs, frozen and JSON round-trippable
(architecture §4 "Config ownership": every run writes its fully resolved config as JSON next to
its checkpoints; spec minicpm4-system.md §5.1 WSD + μP; anchors Part B §2 for the DDP/FSDP2
choice).

Batch arithmetic: each optimizer step consumes ``grad_accum`` micro-batches of ``batch_size``
rows of ``seq_len`` tokens on each of the ``world_size`` ranks, so the global batch is
world_size x grad_accum x batch_size rows. The loss is the mean over every non-ignored target
of the global batch (see `train/step.py`), so 2 ranks x B rows equal 1 process x 2B rows.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicpm4.model.config import ModelConfig
from minicpm4.model.hf import config_from_hf_dict, config_to_hf_dict
from minicpm4.train.config import OptimConfig, ScheduleConfig

DTYPES = ("float32", "bfloat16")
"""Compute dtypes: fp32, or bf16 autocast over fp32 master weights (fp16 is not offered: it is
~100x slower on CPU and needs loss scaling on GPU)."""
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"TrainConfig.{name}: must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One pre-training run (see the module docstring for the batch arithmetic)."""

    model: ModelConfig
    """Architecture of the model to train (ignored weights-wise when `init_from` is set)."""
    data: str
    """Token shard folder (`minicpm4 data tokenize` output, e.g. ``out/train``)."""
    run_dir: str
    """Where metrics.jsonl, config.json and checkpoints/ go."""
    optim: OptimConfig
    """AdamW settings; `optim.parametrization` is the run's parametrization ("mup"/"sp")."""
    schedule: ScheduleConfig
    """WSD schedule; `schedule.total_steps` is the run length in optimizer steps."""
    eval_data: str | None = None
    """Held-out shard folder (e.g. ``out/eval``); None disables evaluation."""
    init_from: str | None = None
    """HF model folder to start from instead of a fresh μP/SP init."""
    seq_len: int = 256
    """Tokens per row."""
    batch_size: int = 8
    """Rows per micro-batch on each rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank."""
    eval_interval: int = 0
    """Evaluate every this many steps (and after the last); 0 = only after the last step."""
    eval_batches: int = 8
    """Eval micro-batches per evaluation (per rank; held-out windows in stream order)."""
    checkpoint_interval: int = 0
    """Save every this many steps (and after the last); 0 = only after the last step."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    log_interval: int = 1
    """Print a progress line every this many steps (the JSONL log gets every step)."""
    dtype: str = "float32"
    """Compute dtype, one of `DTYPES`."""
    seed: int = 0
    """Seeds the init, the data order and every RNG."""
    device: str = "auto"
    """"auto", "cpu" or "cuda"."""
    distributed: str = "auto"
    """"none", "ddp", "fsdp", or "auto" (DDP under torchrun, none otherwise)."""
    mtp_lambda: float = 0.0
    """Weight of the MTP loss (needs ``model.num_mtp_layers == 1``); 0 trains next-token only."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Free-form notes recorded in the resolved config."""

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def parametrization(self) -> str:
        return self.optim.parametrization

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            raise ValueError("TrainConfig.model: expected a ModelConfig")
        if not isinstance(self.optim, OptimConfig) or not isinstance(self.schedule, ScheduleConfig):
            raise ValueError("TrainConfig.optim/schedule: expected OptimConfig / ScheduleConfig")
        for name in ("data", "run_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"TrainConfig.{name}: must be a non-empty path string")
        for name, low in (("seq_len", 1), ("batch_size", 1), ("grad_accum", 1),
                          ("eval_interval", 0), ("eval_batches", 1), ("checkpoint_interval", 0),
                          ("keep_checkpoints", 1), ("log_interval", 1), ("seed", 0)):
            _int(name, getattr(self, name), low)
        if self.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"TrainConfig.seq_len: {self.seq_len} exceeds the model's "
                             f"max_position_embeddings {self.model.max_position_embeddings}")
        for name, choices in (("dtype", DTYPES), ("device", DEVICES),
                              ("distributed", DISTRIBUTED)):
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainConfig.{name}: must be one of {choices}, "
                                 f"got {getattr(self, name)!r}")
        lam = self.mtp_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) \
                or not 0 <= lam < float("inf"):
            raise ValueError(f"TrainConfig.mtp_lambda: must be a finite number >= 0, got {lam!r}")
        if lam > 0 and self.model.num_mtp_layers != 1:
            raise ValueError("TrainConfig.mtp_lambda: > 0 needs a model with an MTP head "
                             "(model config num_mtp_layers = 1)")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the model as its HF config.json object)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model"] = config_to_hf_dict(self.model)
        out["optim"] = dataclasses.asdict(self.optim)
        out["optim"]["betas"] = list(self.optim.betas)
        out["schedule"] = dataclasses.asdict(self.schedule)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        raw = dict(raw)
        try:
            raw["model"] = config_from_hf_dict(raw["model"])
            optim = dict(raw["optim"])
            optim["betas"] = tuple(optim["betas"])
            raw["optim"] = OptimConfig(**optim)
            raw["schedule"] = ScheduleConfig(**raw["schedule"])
            return cls(**raw)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a TrainConfig object: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a resolved-config JSON file written by a run."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read train config {path}: {exc}") from exc
        return cls.from_dict(raw)
