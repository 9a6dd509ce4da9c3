"""Summary and loss curve of a training run folder (`minicpm4 report`; issue 3 "progress and
logs"): reads the run's `metrics.jsonl` and resolved `config.json` written by `train/loop.py`.

The summary is a JSON-able dict (steps, tokens, wall time, tokens/s, first / last / best
losses, every eval); the plot shows the training loss (next-token part when the MTP head is
trained, and the MTP loss), the held-out loss at each eval, and the learning rate, against
tokens seen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minicpm4.train.coord_check import save_figure
from minicpm4.train.loop import METRICS_FILE


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl` (ValueError if missing, empty or malformed)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist (not a `minicpm4 train` run folder?)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc})") from exc
    if not any(r.get("kind") == "train" for r in records):
        raise ValueError(f"{path} holds no training steps")
    return records


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """Totals and losses of a run (see the module docstring)."""
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    seconds = sum(r["seconds"] for r in train)
    tokens = sum(r["num_tokens"] for r in train)
    key = "ntp_loss" if "ntp_loss" in train[0] else "loss"
    tail = train[-min(20, len(train)):]
    out: dict[str, Any] = {
        "steps": len(train), "tokens": tokens, "train_seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "first_train_loss": round(train[0][key], 4),
        "last_train_loss_mean_of_20": round(sum(r[key] for r in tail) / len(tail), 4),
        "evals": [{"step": r["step"] + 1, "loss": round(r["loss"], 4),
                   "perplexity": round(r["perplexity"], 2)} for r in evals],
    }
    if "mtp_loss" in train[0]:
        out["last_mtp_loss_mean_of_20"] = round(sum(r["mtp_loss"] for r in tail) / len(tail), 4)
    config = Path(run_dir) / "config.json"
    if config.is_file():
        out["config"] = json.loads(config.read_text(encoding="utf-8"))
    return out


def plot_run(run_dir: str | Path, path: str | Path, *, title: str | None = None) -> Path:
    """Loss curves (left axis, log tokens) and LR (right axis) as a PNG at `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    seen, total = {}, 0
    for r in train:
        total += r["num_tokens"]
        seen[r["step"]] = total
    x = [seen[r["step"]] / 1e6 for r in train]
    window = max(1, len(train) // 100)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if "ntp_loss" in train[0]:
        ax.plot(x, _smooth([r["ntp_loss"] for r in train], window), label="train next-token")
        ax.plot(x, _smooth([r["mtp_loss"] for r in train], window), label="train MTP (t+2)",
                alpha=0.7)
    else:
        ax.plot(x, _smooth([r["loss"] for r in train], window), label="train")
    if evals:
        ax.plot([seen[r["step"]] / 1e6 for r in evals], [r["loss"] for r in evals], "o-",
                label="held-out")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel(f"cross-entropy (nats; train smoothed over {window} steps)")
    ax.set_ylim(top=min(12.0, max(r["loss"] for r in train)) + 0.2)
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(x, [r["lr"] for r in train], color="grey", linestyle=":", label="LR")
    lr_ax.set_ylabel("learning rate (base group)")
    lines = ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right")
    ax.set_title(title or f"training run {Path(run_dir).name}")
    return save_figure(fig, path)
