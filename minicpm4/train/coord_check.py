"""μP coordinate check (anchors Part B §1.4 "Coordinate check", §1.6 measured recipe; spec
minicpm4-system.md §1.1 μP rules, §5.2 ModelTunnel v2).

The cheapest correctness test of a parametrization ("a gradient check for
parametrizations"): build the same small MiniCPM4 at several widths, train each for a few
steps on one fixed batch with a deliberately large AdamW LR, and record the mean |x| of the
embedding output (after `scale_emb`), every decoder layer's output (the residual stream) and
the logits at every step. Under μP the curves are flat in width; under SP they grow with it
(anchors §1.6 measured 62x over 64 -> 512 for the last block after 4 steps; μP within 1.45x).

Models: `coord_config(width)` fixes depth (2), head_dim (32, so heads scale with width),
intermediate = 2 x width, MHA, a byte-sized vocab (256) and dim_model_base = 64 (the smallest
width), weight decay 0. SP models are built from `mup.config_for(cfg, "sp")` (all three forward
scalars 1) and initialised / optimised with the SP rules (`init_model_`, `build_optimizer`).

Step convention: record t = 0 is the forward at init; record t = k is the forward after k
optimizer steps; `steps` updates give steps + 1 records. Each record is the mean over seeds.
The default batch is uniform random ids (seeded); `text_batch` makes a byte-level batch from
a text file instead.

Shape legend: B batch, T tokens, D width.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minicpm4.model import mup
from minicpm4.model.config import ModelConfig
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.train.config import OptimConfig
from minicpm4.train.optim import build_optimizer

DEFAULT_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 1024)
BYTE_VOCAB = 256


def _positive_ints(name: str, values: Sequence[int]) -> tuple[int, ...]:
    values = tuple(values)
    if not values or any(type(v) is not int or v < 1 for v in values):
        raise ValueError(f"{name}: need a non-empty list of positive ints, got {values!r}")
    return values


def coord_config(width: int, *, layers: int = 2, head_dim: int = 32, vocab: int = BYTE_VOCAB,
                 dim_model_base: int = 64, initializer_range: float = 0.02,
                 mlp_ratio: int = 2, max_positions: int = 1024) -> ModelConfig:
    """A μP proxy MiniCPM4 of `width`: heads = width / head_dim (MHA), fp32, untied head."""
    if type(width) is not int or width < head_dim or width % head_dim:
        raise ValueError(f"width: must be a positive multiple of head_dim {head_dim}, "
                         f"got {width!r}")
    heads = width // head_dim
    return ModelConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp_ratio * width,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, head_dim=head_dim,
                       max_position_embeddings=max_positions, dim_model_base=dim_model_base,
                       initializer_range=initializer_range, torch_dtype="float32",
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=(1,),
                       pad_token_id=None)


def build_proxy(cfg: ModelConfig, parametrization: str, seed: int) -> MiniCPM4ForCausalLM:
    """The model of `cfg` under `parametrization` (SP: unit forward scalars), initialised by
    role with `seed`."""
    model = MiniCPM4ForCausalLM(mup.config_for(cfg, parametrization))
    mup.init_model_(model, parametrization, seed=seed)
    return model


def random_batch(vocab: int, batch: int = 8, seq_len: int = 32, seed: int = 1) -> torch.Tensor:
    """Seeded uniform ids [B, T + 1] (inputs are [:, :-1], targets [:, 1:])."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)


def text_batch(path: str | Path, batch: int = 8, seq_len: int = 32) -> torch.Tensor:
    """Byte-level ids [B, T + 1] from consecutive windows at the start of a text file."""
    need = batch * (seq_len + 1)
    data = Path(path).read_bytes()[:need]
    if len(data) < need:
        raise ValueError(f"{path}: has {len(data)} bytes, the batch needs {need}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long().view(batch, seq_len + 1)


def module_names(num_layers: int) -> list[str]:
    """Recorded modules in forward order: embedding, layer.0 .. layer.{L-1}, logits."""
    return ["embedding", *[f"layer.{i}" for i in range(num_layers)], "logits"]


def _run_one(model: MiniCPM4ForCausalLM, ids_BT1: torch.Tensor, steps: int,
             lr: float, parametrization: str) -> dict[str, list[float]]:
    names = module_names(len(model.model.layers))
    seen: dict[str, list[float]] = {n: [] for n in names}
    embed_scale = model.model.embed_scale

    def hook(name: str, scale: float = 1.0):
        def fn(_mod, _args, out):
            seen[name].append(out.detach().abs().mean().item() * scale)
        return fn

    handles = [model.model.embed_tokens.register_forward_hook(hook("embedding", embed_scale))]
    handles += [layer.register_forward_hook(hook(f"layer.{i}"))
                for i, layer in enumerate(model.model.layers)]
    opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0, grad_clip=None,
                                             parametrization=parametrization))
    inputs_BT, targets_BT = ids_BT1[:, :-1], ids_BT1[:, 1:]
    try:
        for t in range(steps + 1):
            logits_BTV = model(inputs_BT)
            seen["logits"].append(logits_BTV.detach().abs().mean().item())
            if t == steps:
                break
            loss = F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()
    return seen


def coord_check(widths: Sequence[int] = DEFAULT_WIDTHS, *,
                parametrizations: Sequence[str] = ("mup", "sp"), steps: int = 4,
                seeds: Sequence[int] = (0, 1, 2), lr: float = 1e-2,
                batch_BT1: torch.Tensor | None = None, layers: int = 2, head_dim: int = 32,
                dim_model_base: int = 64, initializer_range: float = 0.02,
                progress=None) -> dict[str, Any]:
    """Run the coordinate check; returns a JSON-ready dict.

    ``result["curves"][param][module][str(width)]`` is the list of steps + 1 mean-over-seeds
    mean |x| values (module docstring); ``result["ratios"][param][module]`` is max/min across
    widths at the last step (1.0 = perfectly flat).
    """
    widths = _positive_ints("widths", widths)
    seeds = tuple(seeds)
    if not seeds or any(type(s) is not int or s < 0 for s in seeds):
        raise ValueError(f"seeds: need a non-empty list of ints >= 0, got {seeds!r}")
    if type(steps) is not int or steps < 1:
        raise ValueError(f"steps: must be an int >= 1, got {steps!r}")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr: must be a positive finite number, got {lr!r}")
    for p in parametrizations:
        mup.check_parametrization(p)
    vocab = BYTE_VOCAB
    if batch_BT1 is None:
        batch_BT1 = random_batch(vocab)
    if batch_BT1.dim() != 2 or batch_BT1.shape[1] < 2 or int(batch_BT1.max()) >= vocab:
        raise ValueError(f"batch: need ids [B, T+1] in [0, {vocab}), got shape "
                         f"{tuple(batch_BT1.shape)}")
    names = module_names(layers)
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    seconds = 0.0
    for param in parametrizations:
        curves[param] = {n: {} for n in names}
        for width in widths:
            cfg = coord_config(width, layers=layers, head_dim=head_dim, vocab=vocab,
                               dim_model_base=dim_model_base,
                               initializer_range=initializer_range,
                               max_positions=max(1024, batch_BT1.shape[1]))
            start = time.perf_counter()
            runs = [_run_one(build_proxy(cfg, param, seed), batch_BT1, steps, lr, param)
                    for seed in seeds]
            seconds += time.perf_counter() - start
            for n in names:
                curves[param][n][str(width)] = [sum(r[n][t] for r in runs) / len(runs)
                                                for t in range(steps + 1)]
            if progress is not None:
                last = curves[param][names[-2]][str(width)][-1]
                progress(f"{param} width {width}: last block mean|x| at t={steps} "
                         f"{last:.4g} ({time.perf_counter() - start:.1f}s)")
    ratios = {p: {n: _spread([curves[p][n][str(w)][-1] for w in widths]) for n in names}
              for p in curves}
    return {"widths": list(widths), "parametrizations": list(parametrizations),
            "steps": steps, "seeds": list(seeds), "lr": lr, "modules": names,
            "model": {"layers": layers, "head_dim": head_dim, "vocab": vocab,
                      "dim_model_base": dim_model_base, "mlp_ratio": 2,
                      "initializer_range": initializer_range, "weight_decay": 0.0},
            "batch_shape": list(batch_BT1.shape), "curves": curves, "ratios": ratios,
            "seconds": round(seconds, 2)}


def _spread(values: Sequence[float]) -> float:
    return max(values) / min(values) if min(values) > 0 else math.inf


def plot_coord_check(result: dict[str, Any], path: str | Path, *, step: int | None = None) -> Path:
    """PNG: one panel per parametrization, x = log2(width), one line per module at `step`
    (default the last)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["steps"] if step is None else step
    params = result["parametrizations"]
    fig, axes = plt.subplots(1, len(params), figsize=(5.5 * len(params), 4.2), squeeze=False)
    widths = result["widths"]
    for ax, p in zip(axes[0], params):
        for n in result["modules"]:
            ys = [result["curves"][p][n][str(w)][t] for w in widths]
            ax.plot([math.log2(w) for w in widths], ys, marker="o", label=n)
        ax.set_yscale("log")
        ax.set_xlabel("log2(width)")
        ax.set_ylabel(f"mean |x| after {t} steps")
        ax.set_title(f"{p.upper()}: coordinate check (lr {result['lr']:g}, "
                     f"{len(result['seeds'])} seeds)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG (creating the folder) and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def coord_table(result: dict[str, Any]) -> str:
    """Markdown table: mean |x| at t = 0 and t = steps per module and width, with the ratio."""
    widths = result["widths"]
    t = result["steps"]
    head = "| param | module, step | " + " | ".join(f"d={w}" for w in widths) + \
        " | max/min |\n|" + " --- |" * (len(widths) + 3)
    rows = [head]
    for p in result["parametrizations"]:
        for n in result["modules"]:
            for step in (0, t):
                vals = [result["curves"][p][n][str(w)][step] for w in widths]
                rows.append(f"| {p} | {n}, t={step} | " + " | ".join(f"{v:.4g}" for v in vals)
                            + f" | {_spread(vals):.2f} |")
    return "\n".join(rows)


def machine_line() -> str:
    """One line naming the machine, for result reports."""
    import os
    import platform
    return (f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} intra-op thread(s), Python {platform.python_version()}")


def write_report(out: str | Path, stem: str, result: dict[str, Any], title: str,
                 command: str, tables: Sequence[tuple[str, str]], plot) -> list[Path]:
    """Write OUT/stem.json, OUT/stem.png (via `plot(result, path)`) and OUT/stem.md (title,
    machine, date, command, the given (heading, markdown table) pairs)."""
    import datetime
    import json
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.png", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1), encoding="utf-8")
    plot(result, paths[1])
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"# {title}", "", f"- machine: {machine_line()}", f"- date: {now}",
            f"- command: `{command}`", f"- plot: `{paths[1].name}`, data: `{paths[0].name}`", ""]
    for heading, table in tables:
        body += [f"## {heading}", "", table, ""]
    paths[2].write_text("\n".join(body), encoding="utf-8")
    return paths
