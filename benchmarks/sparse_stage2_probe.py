"""Probe: InfLLM v2 stage-2 backends on one configuration (chooses `sparse_attention`'s "auto").

The selection imitates spec §2.2 steps 4-5: 1 sink block, the 32 local blocks before the
query block plus the block itself, and random blocks up to `--topk`, computed per token.
Random block scores are drawn per query block, and each token adds `--jitter` x N(0, 1)
noise. So with jitter 0 all rows of a query block select the same blocks, and with a large
jitter every token selects independently (the worst case for the union gather).
The queries are the last `--q-len` of `--len` positions (1 = a decode step). Prints the
median over `--repeats` of: gather (per row grouping and chunk size), flex (compile time
printed apart), dense causal SDPA, and with `--backward` forward+backward of gather and of
dense SDPA.
Usage: python benchmarks/sparse_stage2_probe.py [--len 8192] [--q-len T] [--heads 16]
       [--kv-heads 1] [--head-dim 128] [--block-size 64] [--topk 96] [--local 32]
       [--jitter 0] [--threads 1]
       [--dtype float32] [--chunks none,256] [--rows auto,block,token] [--backward]
       [--no-flex] [--no-dense] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from minicpm4.kernels.infllm_v2.stage2 import (sparse_attention_flex,
                                               sparse_attention_gather)


def make_indices(K: int, S: int, T: int, bs: int, topk: int, local: int, jitter: float,
                 gen: torch.Generator) -> torch.Tensor:
    """int32 [K, T, topk] for the last T of S positions: per-token top-k over random block
    scores, -1 for future slots."""
    nb = -(-S // bs)
    qblk_T = torch.arange(S - T, S) // bs
    score_KTb = torch.rand(K, nb, nb, generator=gen)[:, qblk_T]
    score_KTb += jitter * torch.randn(K, T, nb, generator=gen)
    b_b = torch.arange(nb)
    forced_Tb = (b_b < 1) | ((b_b <= qblk_T[:, None]) & (b_b >= qblk_T[:, None] - local))
    score_KTb = score_KTb.masked_fill(forced_Tb, float("inf"))
    score_KTb = score_KTb.masked_fill(b_b > qblk_T[:, None], float("-inf"))
    idx_KTk = score_KTb.topk(min(topk, nb), dim=-1).indices.sort(dim=-1).values
    return torch.where(idx_KTk > qblk_T[:, None], -1, idx_KTk).to(torch.int32)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--len", type=int, default=8192)
    ap.add_argument("--q-len", type=int, default=None, help="queries (default: --len)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--topk", type=int, default=96)
    ap.add_argument("--local", type=int, default=32)
    ap.add_argument("--jitter", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chunks", default="none", help="gather chunk sizes (query tokens)")
    ap.add_argument("--rows", default="auto", help="gather row groups: auto,block,token or ints")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows_list = [int(r) if r.isdigit() else r for r in a.rows.split(",")]
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, a.dtype)
    S, N, K, H, bs = a.len, a.heads, a.kv_heads, a.head_dim, a.block_size
    T = a.q_len or S
    off = S - T
    q = torch.randn(N, T, H, generator=gen).to(dtype)
    k = torch.randn(K, S, H, generator=gen).to(dtype)
    v = torch.randn(K, S, H, generator=gen).to(dtype)
    idx = make_indices(K, S, T, bs, a.topk, a.local, a.jitter, gen)
    nb = -(-S // bs)
    sel = (idx >= 0).sum(-1).float().mean().item()
    causal = ((torch.arange(off, S) // bs + 1).float().mean()).item()
    sel_KTb = torch.zeros(K, nb * bs, nb + 1, dtype=torch.bool)
    sel_KTb[:, off:S].scatter_(2, torch.where(idx < 0, nb, idx).long(), True)
    union = sel_KTb[..., :nb].view(K, nb, bs, nb).any(2).sum(-1).float()
    union = union[:, off // bs:].mean().item()
    print(f"S={S} T={T} N={N} K={K} H={H} bs={bs} topk={a.topk} jitter={a.jitter} {a.dtype} "
          f"threads={a.threads}: {sel:.1f} blocks/query of {causal:.1f} causal, "
          f"union {union:.1f} blocks/query block")
    def gather(q, k, v, rows="auto", chunk=None):
        return sparse_attention_gather(q, k, v, idx, block_size=bs, q_offset=off, chunk=chunk,
                                       rows=rows)

    def dense(q, k, v):
        # 4-D and K/V expanded: 3-D inputs or enable_gqa=True took the slow math path here.
        ke, ve = (x.repeat_interleave(N // K, 0)[None] for x in (k, v))
        if T == S:
            return F.scaled_dot_product_attention(q[None], ke, ve, is_causal=True)[0]
        mask = torch.arange(S) <= off + torch.arange(T)[:, None]  # bottom-right causal
        return F.scaled_dot_product_attention(q[None], ke, ve, attn_mask=mask)[0]

    with torch.no_grad():
        for rows in rows_list:
            for c in a.chunks.split(","):
                chunk = None if c == "none" else int(c)
                t = timed(lambda: gather(q, k, v, rows, chunk), a.repeats)
                print(f"gather fwd rows={rows} chunk={c}: {t * 1e3:.0f} ms")
        if not a.no_flex:
            def flex():
                return sparse_attention_flex(q, k, v, idx, block_size=bs, q_offset=off)
            t0 = time.perf_counter()
            ref = flex()
            print(f"flex first call (compile): {time.perf_counter() - t0:.1f} s")
            print(f"flex fwd: {timed(flex, a.repeats) * 1e3:.0f} ms")
            print(f"max |gather - flex| = {(gather(q, k, v) - ref).abs().max().item():.2e}")
        if not a.no_dense:
            print(f"dense causal SDPA fwd: {timed(lambda: dense(q, k, v), a.repeats) * 1e3:.0f} ms")
    if a.backward:
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        dout = torch.randn(N, T, H, generator=gen).to(dtype)
        for rows in rows_list:
            t = timed(lambda: gather(*leaves, rows).backward(dout), a.repeats)
            print(f"gather fwd+bwd rows={rows}: {t * 1e3:.0f} ms")
        if not a.no_dense:
            t = timed(lambda: dense(*leaves).backward(dout), a.repeats)
            print(f"dense causal SDPA fwd+bwd: {t * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
