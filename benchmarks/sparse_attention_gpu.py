"""InfLLM v2 Triton kernels vs dense FlashAttention on one CUDA GPU: one attention layer.

Geometry of MiniCPM4-8B: 16 query heads sharing 1 KV head, head dim 128, bf16, default
`sparse_config` (blocks of 64, 1 sink + 32 local + 64 chosen = 96 blocks, approximate LSE).
Random q/k/v; per length (default 32K, 64K, 128K), forward only, no grad:

- dense: `F.scaled_dot_product_attention(is_causal=True)` forced to the flash backend (K/V
  expanded to 16 heads beforehand, untimed);
- selection, timed separately, two ways: `selection.select_blocks_chunked` (PyTorch), and
  our Triton stage-1 kernel (`stage1_scores_triton`, fused group sum) + PyTorch max-pool and
  top-k (stage-1 kernel time also shown alone);
- stage 2: `sparse_attention_triton` over the selected blocks (host-side index preparation
  included), for each --tiles value (query tokens per program; 1 = the paper's tile).

Times: median of --repeats after one warm-up call (which compiles). Ratios = dense / ours.
Prints last: RESULT sparse_forward_speedup_128k_gpu=<dense / stage 2 (tile 1) at 128K>, the
kernel-level ratio (the paper's "7.4x at 128K" is of this kind, with 16 blocks); the ratio
with selection is printed just before it.
Without CUDA or triton it prints why and exits 0.
Usage: python benchmarks/sparse_attention_gpu.py [--lengths 32768,65536,131072]
       [--repeats 5] [--tiles 1,4] [--chunk 16384]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from minicpm4.kernels.infllm_v2.params import SparseParams
from minicpm4.kernels.infllm_v2.selection import (_finish, _forced_future, compress_keys,
                                                  select_blocks_chunked)

N, K, H = 16, 1, 128


def timed(fn, repeats: int):
    """(median seconds, last result) after one untimed warm-up call."""
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def dense(q_1NLH, k_1NLH, v_1NLH):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q_1NLH, k_1NLH, v_1NLH, is_causal=True)


def blocks_from_scores(S_KTC, *, q_offset: int, num_blocks: int, params: SparseParams):
    """Steps 4-5 (max-pool, forced blocks, top-k) on stage-1 scores, as in selection.py."""
    K_, T, C = S_KTC.shape
    ps = params.pool_stride
    L = ps * num_blocks + 1
    padded = S_KTC.new_full((K_, T, L), -float("inf"))
    padded[..., 1:C + 1] = S_KTC
    scores = F.max_pool1d(padded.view(K_ * T, 1, L), ps + 1, ps).view(K_, T, num_blocks)
    forced, future, q_blk = _forced_future(q_offset, T, num_blocks, params, S_KTC.device)
    scores.masked_fill_(forced, float("inf")).masked_fill_(future, -float("inf"))
    # Ties (neighbouring blocks share a pooled key) go to the lower block id, as in
    # selection.py: scores are >= 0 or -inf, so their fp32 bit patterns order them.
    bits = (scores.clamp_min(0.0) + 0.0).view(torch.int32).long()
    bits.masked_fill_(torch.isneginf(scores), -1)
    key = bits.mul_(num_blocks).add_(torch.arange(num_blocks - 1, -1, -1, device=bits.device))
    width = min(params.num_selected, num_blocks)
    return _finish(key.topk(width, dim=-1, sorted=False).indices, q_blk)


def select_triton(q_NLH, k_KLH, params: SparseParams, chunk: int, stage1_only: bool = False):
    """Selection with the Triton stage-1 kernel, in query chunks (bounded score memory)."""
    from minicpm4.kernels.infllm_v2.triton_kernels import stage1_scores_triton
    L = q_NLH.shape[1]
    kc1 = compress_keys(k_KLH, params.kernel_size, params.kernel_stride)
    kc2 = compress_keys(k_KLH, params.coarse_kernel, params.coarse_stride)
    nb = -(-L // params.block_size)
    parts = []
    for t0 in range(0, L, chunk):
        S = stage1_scores_triton(q_NLH[:, t0:t0 + chunk], kc1, q_offset=t0, params=params,
                                 lse="approx", kc2_KCH=kc2)
        if not stage1_only:
            parts.append(blocks_from_scores(S, q_offset=t0, num_blocks=nb, params=params))
    return None if stage1_only else torch.cat(parts, dim=1)


def run_length(L: int, params: SparseParams, args) -> dict:
    from minicpm4.kernels.infllm_v2.triton_kernels import sparse_attention_triton
    g = torch.Generator(device="cuda").manual_seed(L)
    q, k, v = (torch.randn(n, L, H, generator=g, device="cuda", dtype=torch.bfloat16)
               for n in (N, K, K))
    row = {"L": L}
    kx, vx = (x.repeat_interleave(N // K, 0)[None] for x in (k, v))
    row["dense"], out_dense = timed(functools.partial(dense, q[None], kx, vx), args.repeats)
    del kx, vx
    row["sel_torch"], idx = timed(lambda: select_blocks_chunked(q, k, params=params,
                                                                lse="approx"), args.repeats)
    row["sel_triton"], idx_tr = timed(lambda: select_triton(q, k, params, args.chunk),
                                      args.repeats)
    row["stage1"], _ = timed(lambda: select_triton(q, k, params, args.chunk, True), args.repeats)
    row["sel_agree"] = float((idx_tr.sort(-1).values == idx.sort(-1).values).float().mean())
    for rt in args.tiles:
        row[f"stage2_t{rt}"], out = timed(lambda: sparse_attention_triton(
            q, k, v, idx, block_size=params.block_size, tokens_per_tile=rt), args.repeats)
        n = params.num_selected * params.block_size  # rows that see every causal block
        row[f"early_maxdiff_t{rt}"] = float((out[:, :n] - out_dense[0, :, :n]).abs().max())
    row["visible"] = float((idx >= 0).sum(-1).float().mean())
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiles", default="1,4", help="tokens_per_tile values for stage 2")
    ap.add_argument("--chunk", type=int, default=16384, help="query chunk of the selection")
    args = ap.parse_args()
    args.tiles = [int(x) for x in args.tiles.split(",")]
    if not torch.cuda.is_available():
        print("sparse_attention_gpu: no CUDA device here; this benchmark needs a GPU "
              "(nothing measured)")
        return 0
    from minicpm4.kernels.infllm_v2.triton_kernels import HAVE_TRITON
    if not HAVE_TRITON:
        print("sparse_attention_gpu: triton is not installed (pip install triton==3.9.0); "
              "nothing measured")
        return 0
    import triton
    params = SparseParams()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; one layer: {N} query heads / {K} KV head, head dim {H}, "
          f"bf16; {params}")
    rows = []
    for L in [int(x) for x in args.lengths.split(",")]:
        r = run_length(L, params, args)
        rows.append(r)
        sel = min(r["sel_torch"], r["sel_triton"])
        print(f"L={L:6d}: dense flash {r['dense'] * 1e3:8.2f} ms | selection: torch "
              f"{r['sel_torch'] * 1e3:.2f} ms, triton stage 1 + torch top-k "
              f"{r['sel_triton'] * 1e3:.2f} ms (stage-1 kernel {r['stage1'] * 1e3:.2f} ms; "
              f"same blocks {r['sel_agree']:.1%}) | {r['visible']:.1f} blocks/query")
        for rt in args.tiles:
            s2 = r[f"stage2_t{rt}"]
            print(f"L={L:6d}:   stage 2 tile {rt}: {s2 * 1e3:8.2f} ms -> x{r['dense'] / s2:.2f} "
                  f"vs dense (attention only), x{r['dense'] / (s2 + sel):.2f} incl. the faster "
                  f"selection; early rows |sparse - dense| {r[f'early_maxdiff_t{rt}']:.1e}")
        sys.stdout.flush()
    at = {r["L"]: r for r in rows}
    if 131072 in at:
        r, rt = at[131072], args.tiles[0]
        sel = min(r["sel_torch"], r["sel_triton"])
        print(f"sparse_forward_speedup_128k_gpu_incl_selection="
              f"{r['dense'] / (r[f'stage2_t{rt}'] + sel):.3f}")
        print(f"RESULT sparse_forward_speedup_128k_gpu={r['dense'] / r[f'stage2_t{rt}']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
