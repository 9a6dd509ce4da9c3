"""ModelTunnel: μP LR (and init-scale) search on proxy widths (anchors Part B §1.4 "LR
transfer", §1.5 MiniCPM's wind tunnel, §1.6 measured sweep; spec minicpm4-system.md §5.2
ModelTunnel v2).

`lr_sweep` trains small MiniCPM4 proxies (`coord_check.coord_config`: 2 layers, head_dim 32,
dim_model_base = the smallest width unless given) at several widths over a log2 LR grid, under
μP and SP, with AdamW + the WSD schedule (`train.schedule.WSDSchedule`), every run on the
same data order and init seed. Each run is scored twice on a held-out book:

* the **ModelTunnel v2 indicator** (spec §5.2, ScalingBench-style): the *conditional* loss of
  continuations given their context — each held-out passage of `seq_len + 1` tokens is cut
  into a context (the first `context_len` tokens) and a continuation (the rest), and only the
  continuation tokens are scored (`conditional_nll`). ScalingBench scores (reasoning + answer)
  given the question; on plain books the second half of a passage given the first is the
  offline stand-in;
* the plain LM loss over every token of the same passages.

Data (`prepare_corpus`): a text folder is tokenized with the bundled MiniCPM4 tokenizer
(`data.tokenize.tokenize_corpus`, one file held out), or an existing `data tokenize` output
(with train/ and eval/) is read. To keep the LM head cheap the ids are remapped to a compact
vocabulary: id 0 is an "other" bucket, ids 1..V-1 are the V-1 most frequent ids of the
training split (ties by id); every other id, held-out ones included, maps to 0. The chosen
values to transfer are the μP argmin LR per proxy width and the LR minimising the mean
indicator across widths (`chosen_values`).

Shape legend: N passages, L = seq_len + 1 passage tokens, T = L - 1, V compact vocab, B batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from minicpm4.data.tokenize import iter_shard_documents, tokenize_corpus
from minicpm4.model import mup
from minicpm4.train.config import OptimConfig, ScheduleConfig
from minicpm4.train.coord_check import build_proxy, coord_config, save_figure
from minicpm4.train.optim import build_optimizer
from minicpm4.train.schedule import WSDSchedule

OTHER_ID = 0
"""Compact id of every token outside the kept vocabulary."""


# Data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    """A train stream and a held-out stream in compact ids (module docstring)."""

    train: np.ndarray
    """int64 compact ids of the training split (documents concatenated)."""
    eval: np.ndarray
    """int64 compact ids of the held-out split."""
    kept_ids: np.ndarray
    """Tokenizer id of compact id k (k >= 1); kept_ids[0] = -1 stands for "other"."""
    oov_rate: dict[str, float]
    """Share of tokens mapped to the "other" bucket, per split."""

    @property
    def vocab_size(self) -> int:
        return len(self.kept_ids)


def compact_vocab(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> Corpus:
    """Remap tokenizer ids to the compact vocabulary built from `train_ids`."""
    if type(vocab_size) is not int or vocab_size < 2:
        raise ValueError(f"vocab_size: must be an int >= 2, got {vocab_size!r}")
    train_ids = np.asarray(train_ids, dtype=np.int64)
    eval_ids = np.asarray(eval_ids, dtype=np.int64)
    if train_ids.size == 0 or eval_ids.size == 0:
        raise ValueError("corpus: both the train and the held-out split need tokens")
    top = int(max(train_ids.max(), eval_ids.max())) + 1
    counts = np.bincount(train_ids, minlength=top)
    order = np.lexsort((np.arange(top), -counts))  # by count desc, then id
    kept = order[:vocab_size - 1]
    kept = kept[counts[kept] > 0]
    table = np.full(top, OTHER_ID, dtype=np.int64)
    table[kept] = np.arange(1, len(kept) + 1)
    train_c, eval_c = table[train_ids], table[eval_ids]
    return Corpus(train=train_c, eval=eval_c, kept_ids=np.concatenate([[-1], kept]),
                  oov_rate={"train": float((train_c == OTHER_ID).mean()),
                            "eval": float((eval_c == OTHER_ID).mean())})


def prepare_corpus(data: str | Path, work_dir: str | Path, *, holdout: Sequence[str] = (),
                   vocab_size: int = 2048, progress=None) -> Corpus:
    """Load `data` (a `data tokenize` output with train/ and eval/, or text files / a folder
    to tokenize into `work_dir`/tokens with `holdout` as the eval split) in compact ids."""
    data = Path(data)
    if (data / "train" / "index.json").exists():
        folders = {"train": data / "train", "eval": data / "eval"}
        if not (folders["eval"] / "index.json").exists():
            raise ValueError(f"{data}: has train/ but no eval/ shard folder (tokenize with "
                             "--holdout)")
    else:
        if not holdout:
            raise ValueError("holdout: name at least one input file to hold out (the "
                             "ModelTunnel indicator is scored on a held-out book)")
        folders = tokenize_corpus([data], Path(work_dir) / "tokens", holdout=holdout,
                                  progress=progress)
    streams = {k: np.concatenate([np.asarray(d, dtype=np.int64)
                                  for d in iter_shard_documents(f)]) for k, f in folders.items()}
    return compact_vocab(streams["train"], streams["eval"], vocab_size)


def eval_passages(stream: np.ndarray, num: int, length: int) -> torch.Tensor:
    """`num` non-overlapping passages [N, L] evenly spaced over a held-out stream."""
    if len(stream) < num * length:
        raise ValueError(f"held-out split: {len(stream)} tokens < {num} passages x {length}")
    starts = np.linspace(0, len(stream) - length, num).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s:s + length] for s in starts]))


def train_batches(stream: np.ndarray, steps: int, batch: int, length: int,
                  seed: int) -> torch.Tensor:
    """Seeded random windows [steps, B, L] of the training stream (same for every run)."""
    if len(stream) <= length:
        raise ValueError(f"train split: {len(stream)} tokens <= one window of {length}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - length, size=(steps, batch))
    idx = starts[..., None] + np.arange(length)
    return torch.from_numpy(stream[idx])


# The ModelTunnel v2 indicator ----------------------------------------------------------------
def conditional_nll(logits_NTV: torch.Tensor, passages_NL: torch.Tensor,
                    context_len: int) -> tuple[float, float]:
    """(conditional, plain) mean next-token NLL of passages given logits of passages[:, :-1].

    conditional: mean of -log p(x_j | x_<j) over continuation tokens j >= context_len (the
    ScalingBench-style "answer given context" loss, spec §5.2); plain: over every j >= 1.
    """
    N, L = passages_NL.shape
    if logits_NTV.shape[:2] != (N, L - 1):
        raise ValueError(f"logits {tuple(logits_NTV.shape)} do not match passages "
                         f"{tuple(passages_NL.shape)} (need [N, L-1, V])")
    if type(context_len) is not int or not 1 <= context_len < L:
        raise ValueError(f"context_len: must be an int in [1, {L}), got {context_len!r}")
    nll_NT = F.cross_entropy(logits_NTV.float().flatten(0, 1), passages_NL[:, 1:].flatten(),
                             reduction="none").view(N, L - 1)
    return nll_NT[:, context_len - 1:].mean().item(), nll_NT.mean().item()


@torch.no_grad()
def indicator(model: torch.nn.Module, passages_NL: torch.Tensor, context_len: int,
              chunk: int = 16) -> tuple[float, float]:
    """`conditional_nll` of `model` over the passages, in chunks (token-weighted means)."""
    model.eval()
    cond = plain = 0.0
    for i in range(0, len(passages_NL), chunk):
        p_NL = passages_NL[i:i + chunk]
        c, a = conditional_nll(model(p_NL[:, :-1]), p_NL, context_len)
        cond, plain = cond + c * len(p_NL), plain + a * len(p_NL)
    model.train()
    return cond / len(passages_NL), plain / len(passages_NL)


# One proxy run and the sweep -----------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SweepSettings:
    """What every run of a sweep shares."""

    steps: int = 120
    batch: int = 8
    seq_len: int = 64
    warmup_fraction: float = 0.1
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    layers: int = 2
    head_dim: int = 32
    dim_model_base: int | None = None
    """μP base width; None = the smallest swept width."""
    num_passages: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq_len", "layers", "head_dim", "num_passages"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"SweepSettings.{name}: must be an int >= 1, "
                                 f"got {getattr(self, name)!r}")
        if self.dim_model_base is not None and (type(self.dim_model_base) is not int
                                                or self.dim_model_base < 1):
            raise ValueError(f"SweepSettings.dim_model_base: must be None or an int >= 1, "
                             f"got {self.dim_model_base!r}")
        if self.seq_len < 3:
            raise ValueError(f"SweepSettings.seq_len: must be >= 3, got {self.seq_len}")


def run_proxy(corpus: Corpus, width: int, lr: float, parametrization: str, s: SweepSettings,
              *, dim_model_base: int, init_std: float = 0.02,
              batches_SBL: torch.Tensor | None = None,
              passages_NL: torch.Tensor | None = None) -> dict[str, Any]:
    """Train one proxy and score it; diverged runs (non-finite loss) get inf losses."""
    mup.check_parametrization(parametrization)
    L = s.seq_len + 1
    if batches_SBL is None:
        batches_SBL = train_batches(corpus.train, s.steps, s.batch, L, s.seed)
    if passages_NL is None:
        passages_NL = eval_passages(corpus.eval, s.num_passages, L)
    cfg = coord_config(width, layers=s.layers, head_dim=s.head_dim, vocab=corpus.vocab_size,
                       dim_model_base=dim_model_base, initializer_range=init_std,
                       max_positions=max(256, L))
    torch.manual_seed(s.seed)
    model = build_proxy(cfg, parametrization, s.seed)
    opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=s.weight_decay,
                                             parametrization=parametrization))
    warmup = int(round(s.warmup_fraction * s.steps))
    sched = WSDSchedule(ScheduleConfig(warmup_steps=warmup, total_steps=s.steps,
                                       decay_fraction=s.decay_fraction), lr)
    start, train_loss, diverged = time.perf_counter(), math.nan, False
    for step in range(s.steps):
        ids_BL = batches_SBL[step]
        sched.apply(opt, step)
        logits_BTV = model(ids_BL[:, :-1])
        loss = F.cross_entropy(logits_BTV.flatten(0, 1), ids_BL[:, 1:].flatten())
        train_loss = loss.item()
        if not math.isfinite(train_loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    cond, plain = (math.inf, math.inf) if diverged else indicator(model, passages_NL, L // 2)
    if not (math.isfinite(cond) and math.isfinite(plain)):
        cond, plain, diverged = math.inf, math.inf, True
    return {"parametrization": parametrization, "width": width, "lr": lr,
            "log2_lr": math.log2(lr), "init_std": init_std, "cond_loss": cond,
            "lm_loss": plain, "train_loss": train_loss, "diverged": diverged,
            "seconds": round(time.perf_counter() - start, 2)}


def lr_sweep(corpus: Corpus, widths: Sequence[int], lrs: Sequence[float], *,
             parametrizations: Sequence[str] = ("mup", "sp"),
             init_stds: Sequence[float] = (0.02,), settings: SweepSettings | None = None,
             progress=None) -> dict[str, Any]:
    """Every (parametrization, width, init_std, lr) run; JSON-ready, with `best` per
    (parametrization, width) by the conditional indicator and `chosen` (`chosen_values`)."""
    s = settings or SweepSettings()
    widths = tuple(widths)
    if not widths or any(type(w) is not int or w < 1 for w in widths):
        raise ValueError(f"widths: need positive ints, got {widths!r}")
    lrs = tuple(float(x) for x in lrs)
    if not lrs or any(not math.isfinite(x) or x <= 0 for x in lrs):
        raise ValueError(f"lrs: need positive finite numbers, got {lrs!r}")
    if not init_stds or any(not math.isfinite(x) or x <= 0 for x in init_stds):
        raise ValueError(f"init_stds: need positive finite numbers, got {init_stds!r}")
    for p in parametrizations:
        mup.check_parametrization(p)
    base = s.dim_model_base or min(widths)
    L = s.seq_len + 1
    batches_SBL = train_batches(corpus.train, s.steps, s.batch, L, s.seed)
    passages_NL = eval_passages(corpus.eval, s.num_passages, L)
    rows = []
    for p in parametrizations:
        for w in widths:
            for init in init_stds:
                for lr in lrs:
                    row = run_proxy(corpus, w, lr, p, s, dim_model_base=base, init_std=init,
                                    batches_SBL=batches_SBL, passages_NL=passages_NL)
                    rows.append(row)
                    if progress is not None:
                        progress(f"{p} d={w} init={init:g} lr=2^{row['log2_lr']:.1f}: cond "
                                 f"{row['cond_loss']:.4f} lm {row['lm_loss']:.4f} "
                                 f"({row['seconds']:.1f}s)")
    best = {p: {str(w): _argmin([r for r in rows if r["parametrization"] == p
                                 and r["width"] == w]) for w in widths}
            for p in parametrizations}
    return {"widths": list(widths), "lrs": list(lrs), "init_stds": list(init_stds),
            "parametrizations": list(parametrizations), "dim_model_base": base,
            "settings": {**dataclasses.asdict(s), "dim_model_base": base,
                         "context_len": L // 2,
                         "schedule": "WSD, exponential decay to 0.1x"},
            "vocab_size": corpus.vocab_size, "oov_rate": corpus.oov_rate,
            "indicator": "conditional loss of continuation tokens given context (spec §5.2)",
            "runs": rows, "best": best, "chosen": chosen_values(rows, best)}


def _argmin(rows: list[dict[str, Any]], key: str = "cond_loss") -> dict[str, Any]:
    if not rows:
        raise ValueError("no runs to choose from")
    r = min(rows, key=lambda r: (r[key], r["lr"]))
    return {"lr": r["lr"], "log2_lr": r["log2_lr"], "init_std": r["init_std"],
            "cond_loss": r["cond_loss"], "lm_loss": r["lm_loss"],
            "lm_argmin_log2_lr": min(rows, key=lambda r: (r["lm_loss"], r["lr"]))["log2_lr"]}


def chosen_values(rows: list[dict[str, Any]], best: dict[str, Any],
                  parametrization: str = "mup") -> dict[str, Any]:
    """The values to transfer: the μP argmin per width, the (lr, init_std) with the lowest
    mean indicator across widths, and whether every width's argmin lies within one 2x grid
    step of the smallest width's (the anchors' transfer criterion, §1.6)."""
    if parametrization not in best:
        return {}
    mine = [r for r in rows if r["parametrization"] == parametrization]
    widths = sorted({r["width"] for r in mine})
    means: dict[tuple[float, float], float] = {}
    for key in {(r["lr"], r["init_std"]) for r in mine}:
        vals = [r["cond_loss"] for r in mine if (r["lr"], r["init_std"]) == key]
        if len(vals) == len(widths):
            means[key] = sum(vals) / len(vals)
    lr, init = min(means, key=lambda k: (means[k], k[0]))
    per_width = {w: best[parametrization][str(w)]["log2_lr"] for w in widths}
    ref = per_width[widths[0]]
    return {"parametrization": parametrization, "lr": lr, "log2_lr": math.log2(lr),
            "init_std": init, "mean_cond_loss": means[(lr, init)],
            "argmin_log2_lr_per_width": {str(w): v for w, v in per_width.items()},
            "argmin_within_one_grid_step": all(abs(v - ref) <= 1.0 + 1e-9
                                               for v in per_width.values())}


def merge_sweeps(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from sweeps of different parametrizations run apart (e.g. in parallel
    processes) with the same widths, LRs, init stds and settings."""
    if not results:
        raise ValueError("results: nothing to merge")
    first = results[0]
    for r in results[1:]:
        for key in ("widths", "lrs", "init_stds", "settings", "vocab_size"):
            if r[key] != first[key]:
                raise ValueError(f"results: {key} differs between the sweeps to merge")
    params = [p for r in results for p in r["parametrizations"]]
    if len(set(params)) != len(params):
        raise ValueError(f"results: parametrizations overlap: {params}")
    runs = [row for r in results for row in r["runs"]]
    best = {p: b for r in results for p, b in r["best"].items()}
    return {**first, "parametrizations": params, "runs": runs, "best": best,
            "chosen": chosen_values(runs, best)}


# Reporting -----------------------------------------------------------------------------------
def plot_sweep(result: dict[str, Any], path: str | Path) -> Path:
    """PNG: columns = parametrizations, rows = (conditional indicator, LM loss); x = log2 LR,
    one curve per width (first init_std)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = result["parametrizations"]
    init = result["init_stds"][0]
    fig, axes = plt.subplots(2, len(params), figsize=(5.5 * len(params), 8), squeeze=False)
    for col, p in enumerate(params):
        for row, (key, label) in enumerate((("cond_loss", "conditional loss (indicator)"),
                                            ("lm_loss", "LM loss"))):
            ax = axes[row][col]
            for w in result["widths"]:
                rs = sorted((r for r in result["runs"] if r["parametrization"] == p
                             and r["width"] == w and r["init_std"] == init),
                            key=lambda r: r["lr"])
                xs = [r["log2_lr"] for r in rs if math.isfinite(r[key])]
                ys = [r[key] for r in rs if math.isfinite(r[key])]
                ax.plot(xs, ys, marker="o", label=f"d={w}")
            ax.set_xlabel("log2(LR)")
            ax.set_ylabel(f"held-out {label}")
            ax.set_title(f"{p.upper()}: {label}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def sweep_table(result: dict[str, Any], key: str = "cond_loss") -> str:
    """Markdown: one row per (parametrization, width, init_std), one column per LR, the
    best value in bold."""
    lrs = sorted(result["lrs"])
    rows = ["| param | width | init | best log2 LR | " + " | ".join(
        f"2^{math.log2(x):.3g}" for x in lrs) + " |", "|" + " --- |" * (len(lrs) + 4)]
    for p in result["parametrizations"]:
        for w in result["widths"]:
            for init in result["init_stds"]:
                got = {r["lr"]: r[key] for r in result["runs"] if r["parametrization"] == p
                       and r["width"] == w and r["init_std"] == init}
                lo = min(got.values())
                best = min(x for x in got if got[x] == lo)
                cells = [("**%.4f**" if x == best else "%.4f") % got[x]
                         if math.isfinite(got[x]) else "div." for x in lrs]
                rows.append(f"| {p} | {w} | {init:g} | {math.log2(best):.3g} | "
                            + " | ".join(cells) + " |")
    return "\n".join(rows)
