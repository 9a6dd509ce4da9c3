"""Probe: rows per work item of the C++ InfLLM v2 stage 2 (`stage2_cpp.ROWS`; issue 4 #5).

One layer of MiniCPM4-8B's geometry (16 query heads / 1 KV head, head dim 128, fp32, default
`sparse_config`), random q/k/v, blocks chosen by the real selection (`select_blocks_cpp`,
approximate LSE). Times stage 2 alone for each --rows value in the same process, and the max
difference of each output from the first (different row groups only reorder the sums).
This printed the numbers in `stage2_cpp.ROWS`'s docstring.
Prints last: RESULT sparse_stage2_best_rows=<fastest rows value at the last length>.
Usage: python benchmarks/sparse_stage2_rows.py [--lengths 65536] [--rows 64,128,256]
       [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from minicpm4.kernels.infllm_v2 import stage2_cpp
from minicpm4.kernels.infllm_v2.params import SparseParams
from minicpm4.kernels.infllm_v2.select_cpp import select_blocks_cpp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="65536")
    ap.add_argument("--rows", default="64,128,256")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = SparseParams()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 16/1 heads, head dim "
          f"128, fp32; {params}")
    best = None
    for L in [int(x) for x in args.lengths.split(",")]:
        g = torch.Generator().manual_seed(L)
        q = torch.randn(16, L, 128, generator=g)
        k = torch.randn(1, L, 128, generator=g)
        v = torch.randn(1, L, 128, generator=g)
        idx = select_blocks_cpp(q, k, params=params, lse="approx")
        stage2_cpp.sparse_attention_cpp_one(q[:, :64], k[:, :64], v[:, :64], idx[:, :64], 64, 0)
        times, first = {}, None
        for rows in [int(x) for x in args.rows.split(",")]:
            t0 = time.perf_counter()
            out = stage2_cpp.sparse_attention_cpp_one(q, k, v, idx, params.block_size, 0, rows)
            times[rows] = time.perf_counter() - t0
            first = out if first is None else first
            print(f"L={L} rows={rows}: stage 2 {times[rows]:.2f}s, max |diff| vs rows="
                  f"{next(iter(times))} {float((out - first).abs().max()):.0e}", flush=True)
        best = min(times, key=times.get)
    print(f"RESULT sparse_stage2_best_rows={best}")


if __name__ == "__main__":
    main()
