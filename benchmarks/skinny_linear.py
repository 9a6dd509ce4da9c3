"""Skinny bf16 GEMM (kernels/skinny_linear.py) vs torch's F.linear, decode-sized rows (issue 5 #5).

For every distinct linear shape of the two models `benchmarks/serve.py` runs (the random
MiniCPM4-0.5B-shaped preset and the bundled demo model: q/k/v/o, gate/up, down, LM head) and
M in 1, 8, 32 rows, times in the same run: `F.linear` in bf16, our kernel on the same bf16
weights, and `F.linear` in fp32 (fp32 weights). Weights are cycled through enough copies to
exceed the last-level cache, as in a decode step where every weight is read once from memory
(a single small matrix would stay in cache and look much faster than it runs in a model): by
default 2.5x the L3 size the OS reports (at least 96 MB). Before 2026-12-07 the default was a
fixed 96 MB, which is beyond the LLC of the EPYC VMs but *inside* the 480 MB L3 of the AMX
Xeon VM, so the AMX-era records measured L3, not memory, bandwidth.
Prints per shape the times, the weight bytes streamed per second (GB/s, 2 bytes per bf16 and
4 per fp32 weight), the ratio F.linear bf16 / ours, and last
`RESULT skinny_linear_speedup_m8=<geometric mean over shapes of that ratio at M = 8>`.
With `--bucketed`, also times `kernels/matmul.bucketed_linear` (oneDNN on rows padded to a
bucket: what the engine runs for more rows than `skinny_linear.max_rows()`) and prints the
ratio bucketed / ours, the comparison behind the kernel's row cut-over.
Usage: python benchmarks/skinny_linear.py [--rows 1,8,32] [--cache-mb MB] [--min-time 0.3]
       [--bucketed]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minicpm4.kernels import cpu_ext, matmul, skinny_linear
from minicpm4.loading import BUNDLED_MODEL, PRESETS
from minicpm4.model.config import ModelConfig
from minicpm4.model.hf import load_config


def model_shapes(name: str, cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """(label, N, K) of each distinct linear of a plain MiniCPM4 model."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim_
    shapes = {
        "q,o": (cfg.num_attention_heads * h, d),
        "k,v": (cfg.num_key_value_heads * h, d),
        "gate,up": (f, d),
        "down": (d, f),
        "lm_head": (cfg.vocab_size, d),
    }
    return [(f"{name}:{k}", n, kk) for k, (n, kk) in shapes.items()]


def l3_bytes() -> int:
    """The largest CPU cache the OS reports (sysfs), 0 when unknown."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best


def time_cycled(fn, xs: list[torch.Tensor], ws: list[torch.Tensor], min_time: float) -> float:
    """Seconds per call of fn(x, w), cycling over the weight copies (cold weights)."""
    for x, w in zip(xs, ws):  # warm-up: one pass over every copy
        fn(x, w)
    calls, t0 = 0, time.perf_counter()
    while True:
        for x, w in zip(xs, ws):
            fn(x, w)
        calls += len(ws)
        dt = time.perf_counter() - t0
        if dt >= min_time and calls >= 3 * len(ws):
            return dt / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--cache-mb", type=float, default=None,
                    help="bf16 weight copies per shape: at least this many MB (default: 2.5x "
                         "the L3, at least 96)")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    ap.add_argument("--bucketed", action="store_true",
                    help="also time matmul.bucketed_linear (the engine's path past the cut-over)")
    args = ap.parse_args()
    if args.cache_mb is None:
        args.cache_mb = max(96.0, 2.5 * l3_bytes() / 2**20)
    if not cpu_ext.load("skinny_gemm"):
        raise SystemExit("the skinny_gemm extension did not build; nothing to compare")
    op = torch.ops.minicpm4_skinny_gemm.linear
    rows = [int(r) for r in args.rows.split(",")]
    shapes = model_shapes("0.5b", PRESETS["minicpm4-0.5b"]()) + \
        model_shapes("demo", load_config(BUNDLED_MODEL / "config.json"))
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, AVX-512 BF16 kernel: "
          f"{bool(torch.ops.minicpm4_skinny_gemm.has_avx512_bf16())}, AMX tiles: "
          f"{bool(torch.ops.minicpm4_skinny_gemm.has_amx())}, cut-over "
          f"{skinny_linear.max_rows()} rows, weights cycled through {args.cache_mb:.0f} MB "
          f"per shape (L3 {l3_bytes() / 2**20:.0f} MB)")
    print(f"{'shape':>14} {'N':>6} {'K':>5} {'M':>3} {'bf16 ms':>8} {'ours ms':>8} "
          f"{'fp32 ms':>8} {'bf16 GB/s':>9} {'ours GB/s':>9} {'fp32 GB/s':>9} {'bf16/ours':>9} "
          f"{'fp32/ours':>9}" + (f" {'bkt ms':>8} {'bkt/ours':>8}" if args.bucketed else ""))
    ratios: dict[int, list[float]] = {m: [] for m in rows}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for label, N, K in shapes:
            copies = max(1, math.ceil(args.cache_mb * 2**20 / (N * K * 2)))
            ws = [torch.randn(N, K, generator=g).bfloat16() for _ in range(copies)]
            for M in rows:
                xs = [torch.randn(M, K, generator=g).bfloat16() for _ in range(copies)]
                y_ref = xs[0].float() @ ws[0].float().T
                err = (op(xs[0], ws[0], None).float() - y_ref).abs().max().item()
                if err > 2.0 ** -7 * y_ref.abs().max().item():
                    raise SystemExit(f"{label} M={M}: kernel error {err} too large")
                t_bf16 = time_cycled(F.linear, xs, ws, args.min_time)
                t_ours = time_cycled(lambda x, w: op(x, w, None), xs, ws, args.min_time)
                ws32 = [w.float() for w in ws[:max(1, (copies + 1) // 2)]]  # same bytes
                xs32 = [x.float() for x in xs[:len(ws32)]]
                t_fp32 = time_cycled(F.linear, xs32, ws32, args.min_time)
                del ws32, xs32
                extra = ""
                if args.bucketed:
                    t_bkt = time_cycled(lambda x, w: matmul.bucketed_linear(x, w), xs, ws,
                                        args.min_time)
                    extra = f" {t_bkt * 1e3:>8.3f} {t_bkt / t_ours:>8.2f}"
                gb = N * K * 2 / 1e9
                ratios[M].append(t_bf16 / t_ours)
                print(f"{label:>14} {N:>6} {K:>5} {M:>3} {t_bf16 * 1e3:>8.3f} "
                      f"{t_ours * 1e3:>8.3f} {t_fp32 * 1e3:>8.3f} {gb / t_bf16:>9.1f} "
                      f"{gb / t_ours:>9.1f} {2 * gb / t_fp32:>9.1f} {t_bf16 / t_ours:>9.2f} "
                      f"{t_fp32 / t_ours:>9.2f}" + extra, flush=True)
            del ws
    for M in rows:
        geo = math.exp(sum(math.log(r) for r in ratios[M]) / len(ratios[M]))
        print(f"# M={M}: geometric mean F.linear bf16 / ours = {geo:.2f} over {len(ratios[M])} "
              "shapes")
    if 8 in ratios:
        geo8 = math.exp(sum(math.log(r) for r in ratios[8]) / len(ratios[8]))
        print(f"RESULT skinny_linear_speedup_m8={geo8:.3f}")


if __name__ == "__main__":
    main()
