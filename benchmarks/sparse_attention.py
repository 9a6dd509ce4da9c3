"""InfLLM v2 vs dense attention on CPU: one attention layer, one KV group of MiniCPM4-8B
(issue 4 #5; spec §2.1 defaults, §2.4 cost model).

Geometry: 16 query heads sharing 1 KV head, head dim 128, fp32, default `sparse_config`
(kernel 32 / stride 16, blocks of 64, 1 sink + 32 local + 64 chosen = 96 blocks = 6,144
visible tokens, approximate LSE). Random q/k/v. Per length, in the same process:

- prefill: dense causal SDPA (`F.scaled_dot_product_attention(..., is_causal=True,
  enable_gqa=True)`) vs ours = selection (`select_cpp.select_blocks_fast`) + stage 2
  (`sparse_attention`, backend "auto"): the fused C++ kernels when built, as in the model;
  also the pure-PyTorch path (chunked selection + "gather", lengths <= --torch-max) and stage 2
  through compiled `flex_attention` with the same blocks (`backend="flex"`, selection
  excluded, lengths <= --flex-max);
- one decode step at position L-1: dense SDPA of 1 token over L keys vs ours = append the new
  key to the compressed-key buffer + `select_decode_fast` + stage 2 over the chosen blocks.

FLOP bound: dense causal attention FLOPs / stage-2 FLOPs of the selected blocks (the issue's
definition: ~(L/2) / 6144, 2.7x at 32K, 5.3x at 64K), and the same with the selection's
stage-1 FLOPs added to the sparse side; "reached" = measured speedup / bound. Times are the
median of --repeats runs (prefill) or of 20 decode steps.
Prints last: RESULT sparse_prefill_speedup_32k=<dense / ours at 32K>.
Usage: python benchmarks/sparse_attention.py [--lengths 8192,16384,32768,65536]
       [--repeats 1] [--flex-max 32768] [--torch-max 16384] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from minicpm4.kernels.infllm_v2.params import SparseParams
from minicpm4.kernels import cpu_ext
from minicpm4.kernels.infllm_v2.select_cpp import select_blocks_fast, select_decode_fast
from minicpm4.kernels.infllm_v2.decode_selection import CompressedKeyBuffer
from minicpm4.kernels.infllm_v2.selection import select_blocks_chunked
from minicpm4.kernels.infllm_v2.stage2 import sparse_attention

N, K, H = 16, 1, 128


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def dense_prefill(q_1NLH, k_1KLH, v_1KLH):
    return F.scaled_dot_product_attention(q_1NLH, k_1KLH, v_1KLH, is_causal=True,
                                          enable_gqa=True)


def ours_prefill(q_NLH, k_KLH, v_KLH, params: SparseParams):
    """What the model runs: the C++ kernels when built (`select_cpp`, `stage2_cpp`)."""
    idx_KLk = select_blocks_fast(q_NLH, k_KLH, params=params, lse="approx")
    return sparse_attention(q_NLH, k_KLH, v_KLH, idx_KLk, block_size=params.block_size,
                            backend="auto"), idx_KLk


def torch_prefill(q_NLH, k_KLH, v_KLH, params: SparseParams):
    """The pure-PyTorch path (chunked selection + gather stage 2), for comparison."""
    idx_KLk = select_blocks_chunked(q_NLH, k_KLH, params=params, lse="approx")
    return sparse_attention(q_NLH, k_KLH, v_KLH, idx_KLk, block_size=params.block_size,
                            backend="gather")


def visible_keys(idx_KTk: torch.Tensor, bs: int, q_offset: int = 0) -> int:
    """Keys attended by stage 2, summed over (kv head, query): causal part of each block."""
    T = idx_KTk.shape[1]
    pos_1T1 = (q_offset + torch.arange(T)).view(1, T, 1)
    start = idx_KTk.long() * bs
    n = (pos_1T1 + 1 - start).clamp(0, bs)
    return int(torch.where(idx_KTk >= 0, n, 0).sum())


def flops(L: int, idx_KLk: torch.Tensor, params: SparseParams) -> tuple[float, float, float]:
    """(dense causal, stage 2, stage-1 selection) FLOPs of the whole layer."""
    dense = 4.0 * N * H * L * (L + 1) / 2
    stage2 = 4.0 * (N // K) * H * visible_keys(idx_KLk, params.block_size)
    pos = torch.arange(L)
    c1 = ((pos - params.kernel_size + 1).clamp(min=-1) // params.kernel_stride + 1).clamp(min=0)
    c2 = ((pos - params.coarse_kernel + 1).clamp(min=-1) // params.coarse_stride + 1).clamp(min=0)
    stage1 = 2.0 * N * H * float(c1.sum() + c2.sum())
    return dense, stage2, stage1


def decode_step(q_N1H, k_KLH, v_KLH, params: SparseParams):
    """Seconds of one decode step at position L-1 (the buffer before it is built untimed)."""
    L = k_KLH.shape[1]
    buf = CompressedKeyBuffer.from_keys(k_KLH[:, :L - 1], params)
    t0 = time.perf_counter()
    buf.append(k_KLH[:, L - 1:])
    idx = select_decode_fast(q_N1H[:, 0], buf, cache_len=L - 1, params=params, lse="approx")
    sparse_attention(q_N1H, k_KLH, v_KLH, idx, block_size=params.block_size, q_offset=L - 1,
                     backend="auto")
    return time.perf_counter() - t0


def run_length(L: int, params: SparseParams, args) -> dict:
    g = torch.Generator().manual_seed(L)
    q_NLH = torch.randn(N, L, H, generator=g)
    k_KLH = torch.randn(K, L, H, generator=g)
    v_KLH = torch.randn(K, L, H, generator=g)
    row = {"L": L}
    t_ours, (out_ours, idx) = timed(lambda: ours_prefill(q_NLH, k_KLH, v_KLH, params),
                                    args.repeats)
    t_sel, _ = timed(lambda: select_blocks_fast(q_NLH, k_KLH, params=params, lse="approx"), 1)
    if L <= args.torch_max:
        row["torch"], out_torch = timed(lambda: torch_prefill(q_NLH, k_KLH, v_KLH, params), 1)
        row["torch_maxdiff"] = float((out_torch - out_ours).abs().max())
    t_dense, out_dense = timed(lambda: dense_prefill(q_NLH[None], k_KLH[None], v_KLH[None]),
                               args.repeats)
    row.update(dense=t_dense, ours=t_ours, select=t_sel)
    if L <= args.flex_max:
        sparse_attention(q_NLH, k_KLH, v_KLH, idx, block_size=params.block_size,
                         backend="flex")  # compile + warm-up
        row["flex"], out_flex = timed(lambda: sparse_attention(
            q_NLH, k_KLH, v_KLH, idx, block_size=params.block_size, backend="flex"),
            args.repeats)
        row["flex_vs_gather_maxdiff"] = float((out_flex - out_ours).abs().max())
    # decode at position L-1: dense over all L keys vs buffer + selection + stage 2
    q_N1H = q_NLH[:, L - 1:]
    dense_steps, ours_steps = [], []
    for _ in range(20):
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(q_N1H[None], k_KLH[None], v_KLH[None], enable_gqa=True)
        dense_steps.append(time.perf_counter() - t0)
        ours_steps.append(decode_step(q_N1H, k_KLH, v_KLH, params))
    row.update(decode_dense=statistics.median(dense_steps),
               decode_ours=statistics.median(ours_steps))
    dense_f, stage2_f, stage1_f = flops(L, idx, params)
    row.update(bound=dense_f / stage2_f, bound_sel=dense_f / (stage2_f + stage1_f))
    if L <= 16384:  # the sparse output near the start equals dense (all blocks selected)
        n = min(L, params.num_selected * params.block_size)
        row["early_rows_maxdiff"] = float((out_ours[:, :n] - out_dense[0, :, :n]).abs().max())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="8192,16384,32768,65536")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--flex-max", type=int, default=32768,
                    help="time flex_attention only up to this length (its compile and run "
                         "cost; the default keeps a run within 10 minutes)")
    ap.add_argument("--torch-max", type=int, default=16384,
                    help="also time the pure-PyTorch path (chunked selection + gather) up to "
                         "this length")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = SparseParams()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; one layer: {N} query heads "
          f"/ {K} KV head, head dim {H}, fp32; {params}; C++ kernels: "
          f"{'yes' if cpu_ext.load('sparse_attn') and cpu_ext.load('sparse_select') else 'NO'}")
    t_start, rows = time.perf_counter(), []
    for L in [int(x) for x in args.lengths.split(",")]:
        row = run_length(L, params, args)
        rows.append(row)
        speed = row["dense"] / row["ours"]
        flex = (f"flex (same blocks, no selection) {row['flex']:.2f}s "
                f"(x{row['dense'] / row['flex']:.2f} vs dense; max |flex - ours| "
                f"{row['flex_vs_gather_maxdiff']:.1e})") if "flex" in row else "flex skipped"
        print(f"L={L:6d} prefill: dense {row['dense']:.2f}s, ours {row['ours']:.2f}s "
              f"(selection {row['select']:.2f}s) -> x{speed:.2f}; bound x{row['bound']:.2f} "
              f"(attention only, reached {speed / row['bound']:.0%}), x{row['bound_sel']:.2f} "
              f"incl. selection (reached {speed / row['bound_sel']:.0%}); {flex}")
        if "torch" in row:
            print(f"L={L:6d} pure-PyTorch path (chunked selection + gather): "
                  f"{row['torch']:.2f}s -> x{row['dense'] / row['torch']:.2f} vs dense; "
                  f"ours is x{row['torch'] / row['ours']:.2f} faster; max |diff| "
                  f"{row['torch_maxdiff']:.1e}")
        print(f"L={L:6d} decode step: dense {row['decode_dense'] * 1e3:.2f} ms, ours "
              f"{row['decode_ours'] * 1e3:.2f} ms -> x{row['decode_dense'] / row['decode_ours']:.2f}"
              + (f"; early rows |sparse - dense| {row['early_rows_maxdiff']:.1e}"
                 if "early_rows_maxdiff" in row else ""))
    print(f"total time {time.perf_counter() - t_start:.0f}s")
    at = {r["L"]: r for r in rows}
    if 32768 in at:
        print(f"RESULT sparse_prefill_speedup_32k={at[32768]['dense'] / at[32768]['ours']:.3f}")


if __name__ == "__main__":
    main()
