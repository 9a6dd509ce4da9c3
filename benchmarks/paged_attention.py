"""Paged decode attention: the C++ op against the PyTorch path it replaces (issue 5 #5).

For each shape (the demo model's GQA, the MiniCPM4-0.5B's and the 8B's: query heads N, kv
heads K, head dim H), each decode batch B and each row length L, times
- ours: `torch.ops.minicpm4_paged_attention.decode`, reading the keys and values in place
  from the pages through the block table (`csrc/paged_attention.cpp`);
- torch: what the engine runs without it: every row's keys and values gathered from the pages
  into a left-padded [B, K, L, H] copy, widened to fp32, SDPA with a padding mask (GQA heads
  expanded), rounded to bf16.
The pool is laid out as a fresh engine pool fills it (each row's pages in order, rows one
after the other), bf16, random values. Each side is timed twice, alternating, best of the
two kept. Prints a table of microseconds per call and torch / ours, and last
`RESULT paged_attention_vs_torch=<geometric mean of torch / ours>`.
Usage: python benchmarks/paged_attention.py [--rows 1,8,32] [--lens 200,1000,4000]
       [--block-size 16] [--min-time 0.2]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
import torch.nn.functional as F

from minicpm4.kernels import cpu_ext

SHAPES = {"demo": (4, 2, 64), "0.5b": (16, 2, 64), "8b": (32, 2, 128)}  # N, K, H


def make_case(B: int, N: int, K: int, H: int, L: int, bs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    per_row = -(-L // bs)
    blocks = 1 + B * per_row  # block 0 is the engine's scratch block
    k_pages = torch.randn(blocks, bs, K, H, generator=g).bfloat16()
    v_pages = torch.randn(blocks, bs, K, H, generator=g).bfloat16()
    q_BNH = torch.randn(B, N, H, generator=g).bfloat16()
    table_BW = 1 + torch.arange(B * per_row).view(B, per_row)
    return q_BNH, k_pages, v_pages, table_BW, torch.full((B,), L, dtype=torch.long)


def torch_path(q_BNH, k_pages, v_pages, table_BW, lens_B):
    """Gather, widen, SDPA with a padding mask (left padding, as `PagedBatch` builds it)."""
    B, N, H = q_BNH.shape
    bs, K = k_pages.shape[1], k_pages.shape[2]
    S = int(lens_B.max())
    i_S = torch.arange(S)
    start_B = S - lens_B  # left padding
    pos_BS = (i_S.view(1, S) - start_B.view(B, 1)).clamp(min=0)
    slots_BS = table_BW.gather(1, pos_BS // bs) * bs + pos_BS % bs
    k_BKSH = k_pages.view(-1, K, H)[slots_BS].permute(0, 2, 1, 3).float()
    v_BKSH = v_pages.view(-1, K, H)[slots_BS].permute(0, 2, 1, 3).float()
    valid_B11S = (i_S.view(1, S) >= start_B.view(B, 1)).view(B, 1, 1, S)
    out_BN1H = F.scaled_dot_product_attention(
        q_BNH.float().unsqueeze(2), k_BKSH.repeat_interleave(N // K, dim=1),
        v_BKSH.repeat_interleave(N // K, dim=1), attn_mask=valid_B11S)
    return out_BN1H.squeeze(2).to(q_BNH.dtype)


def timed(fn, args, min_time: float) -> float:
    fn(*args)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time or n < 3:
        fn(*args)
        n += 1
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--lens", default="200,1000,4000")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--min-time", type=float, default=0.2)
    args = ap.parse_args()
    if not cpu_ext.load("paged_attention"):
        raise SystemExit("the paged_attention C++ extension cannot be built here")
    ours = torch.ops.minicpm4_paged_attention.decode
    print(f"# {platform.node()} {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, bf16, block size {args.block_size}")
    print(f"{'shape':>5} {'N':>3} {'K':>2} {'H':>4} {'B':>3} {'L':>5} {'torch us':>10} "
          f"{'ours us':>9} {'torch/ours':>10} {'max|diff|':>9}")
    ratios = []
    with torch.inference_mode():
        for name, (N, K, H) in SHAPES.items():
            for B in (int(x) for x in args.rows.split(",")):
                for L in (int(x) for x in args.lens.split(",")):
                    case = make_case(B, N, K, H, L, args.block_size)
                    diff = (ours(*case).float() - torch_path(*case).float()).abs().max()
                    t_torch, t_ours = math.inf, math.inf
                    for _ in range(2):
                        t_torch = min(t_torch, timed(torch_path, case, args.min_time))
                        t_ours = min(t_ours, timed(ours, case, args.min_time))
                    ratios.append(t_torch / t_ours)
                    print(f"{name:>5} {N:>3} {K:>2} {H:>4} {B:>3} {L:>5} {1e6 * t_torch:>10.1f} "
                          f"{1e6 * t_ours:>9.1f} {t_torch / t_ours:>10.2f} {diff:>9.1e}",
                          flush=True)
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"RESULT paged_attention_vs_torch={geo:.2f}")


if __name__ == "__main__":
    main()
