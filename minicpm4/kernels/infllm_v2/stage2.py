"""InfLLM v2 stage 2: causal attention over the selected KV blocks (spec §2.2 step 6, §2.4).

Every query token attends only to the keys of its own selected blocks. The blocks are chosen
per (KV head, query token) and shared by the G = N // K query heads of the group. Inside a
selected block the usual causal rule applies: key s is visible to query i iff
s <= q_offset + i.

Block indices `idx_KTk` are int32 [K, T, k]. They are sorted ascending, -1 marks an empty
slot, and block b covers keys [b*block_size, (b+1)*block_size). Duplicates and future blocks
are tolerated. The keys are the whole prefix including the chunk, so S = q_offset + T.

Backends:
- "reference": a dense boolean mask and an fp32 softmax. Plain autograd; the test oracle.
- "gather": the CPU path for inference and training (`_GatherAttention`). Query rows are
  grouped: by default the rows of one 64-token query block, which share most of their
  blocks. The path gathers the union of the group's selected K/V blocks once into a reused
  buffer. It then runs one masked softmax for the G heads x R rows of the group. The mask is
  applied only to the union blocks that not every row selects, and to the diagonal block.
  Smaller groups (down to one token, as in the CUDA kernel of §2.2 step 6) pay off when the
  rows of a block disagree; rows="auto" picks one with a cost model (`_Plan._best_rows`). The
  backward pass recomputes the probabilities from the saved log-sum-exp, FlashAttention
  style, so memory stays O(T) rather than O(T * selected keys). All math is fp32.
- "cpp" (`stage2_cpp.py`): the fused C++ kernel of `csrc/sparse_attn.cpp`, forward only. Per
  group of rows it scores each selected block only for the rows that picked it (no union
  waste, no gathered copies) with a streaming online softmax. The CPU inference default.
- "flex" (`stage2_flex.py`): compiled `flex_attention`, with a `BlockMask` built from the indices. The
  union of a query block's rows gives the partial KV blocks. Blocks that every row selects
  and that lie wholly in the past are full. A mask_mod looks up the per-token selection, a
  [B, K, T, nb] bool table, and applies causality. It is forward only on CPU: torch raises
  "FlexAttention does not support backward on CPU".
See `sparse_attention` for how "auto" chooses.
Shape legend: B batch, N query heads, K kv heads, G = N // K, T queries, S keys, H head dim,
k slots, b / nb key blocks, Q row groups, R rows per group, M = G*R, U union blocks,
L = U*bs, C groups per chunk.
"""

from __future__ import annotations

import math

import torch

from minicpm4.kernels.infllm_v2 import stage2_cpp
from minicpm4.kernels.infllm_v2.stage2_common import (_batched, _check, _check_all,  # noqa: F401
                                                      _selection, block_mask_from_indices)
from minicpm4.kernels.infllm_v2.stage2_flex import sparse_attention_flex
from minicpm4.kernels.infllm_v2.stage2_masked import masked_one, masked_training

BACKENDS = ("auto", "reference", "gather", "flex", "masked", "cpp")
# fp32 elements of scores (or gathered K/V) per chunk when `chunk` is None: 128 MiB, i.e. 5
# query blocks at G=16 and 96 blocks. One core: as fast as 1 block per chunk. Two threads
# beside another busy process: 8K took 15.0 s with 1 block per chunk, 7.2 s with 4 and
# 6.4 s with 8. Every op of a chunk is an OpenMP barrier, and barriers stall when the cores
# are oversubscribed.
SCORE_BUDGET = 1 << 25
GATHER_COST = 8  # gather rows="auto": a gathered union key costs H / GATHER_COST per row group


# ----------------------------------------------------------------------------- reference

def _reference_one(q_NTH, k_KSH, v_KSH, idx_KTk, block_size, q_offset):
    N, T, H = q_NTH.shape
    K, S, _ = k_KSH.shape
    mask_NTS = block_mask_from_indices(idx_KTk, num_keys=S, block_size=block_size,
                                       q_offset=q_offset).repeat_interleave(N // K, dim=0)
    k_NSH = k_KSH.float().repeat_interleave(N // K, dim=0)
    v_NSH = v_KSH.float().repeat_interleave(N // K, dim=0)
    scores_NTS = q_NTH.float() @ k_NSH.transpose(-1, -2) / math.sqrt(H)
    # finfo.min instead of -inf: a row with no visible key stays finite and is zeroed below.
    scores_NTS = scores_NTS.masked_fill(~mask_NTS, torch.finfo(torch.float32).min)
    probs_NTS = scores_NTS.softmax(dim=-1) * mask_NTS.any(dim=-1, keepdim=True)
    return (probs_NTS @ v_NSH).to(q_NTH.dtype)


# ----------------------------------------------------------------------------- gather

class _Plan:
    """Row groups of one sequence, each with the union of its rows' selected blocks.

    Groups hold R consecutive positions aligned to multiples of R, so the first is padded by
    `front` rows. When all T queries fall in one group (decode), the single group has R = T.
    """

    def __init__(self, idx_KTk, T, S, G, H, block_size, q_offset, chunk, rows):
        dev = idx_KTk.device
        self.K, self.T, self.S, self.bs, self.chunk = idx_KTk.shape[0], T, S, block_size, chunk
        self.q_offset, self.nb = q_offset, -(-S // block_size)
        sel_KTb = _selection(idx_KTk, self.nb, block_size, q_offset)
        R = {"block": block_size, "token": 1}.get(rows, rows)
        if R == "auto":
            R = self._best_rows(sel_KTb, G, H)
        single = q_offset // R == (q_offset + T - 1) // R  # e.g. decode: no padding rows
        self.R, self.front = (T, 0) if single else (R, q_offset % R)
        self.Q = -(-(self.front + T) // self.R)
        sel_KTb = torch.nn.functional.pad(sel_KTb, (0, 0, self.front,
                                                    self.Q * self.R - self.front - T))
        self.sel_KQRb = sel_KTb.view(self.K, self.Q, self.R, self.nb)
        self.pos_QR = (q_offset - self.front + torch.arange(self.Q * self.R, device=dev)
                       ).view(self.Q, self.R)
        # Union blocks in three classes, each ascending: "full" blocks (every row selects them
        # and they lie wholly in the past, so they need no mask), the other selected blocks,
        # then unselected blocks as masked padding.
        union_KQb = self.sel_KQRb.any(dim=2)
        pad_QR1 = ((self.pos_QR < q_offset) | (self.pos_QR >= S))[..., None]
        first_Q1 = self.pos_QR[:, :1].clamp_min(q_offset)
        past_Qb = (torch.arange(self.nb, device=dev) + 1) * block_size <= first_Q1 + 1
        full_KQb = (self.sel_KQRb | pad_QR1).all(dim=2) & past_Qb
        self.count_KQ, self.full_KQ = union_KQb.sum(dim=-1), full_KQb.sum(dim=-1)
        rank_KQb = 2 - union_KQb.to(torch.int8) - full_KQb.to(torch.int8)
        self.order_KQb = torch.argsort(rank_KQb, dim=-1, stable=True)
        self.j_bs = torch.arange(block_size, device=dev)
        self.head_off_K111 = (torch.arange(self.K, device=dev) * S)[:, None, None, None]

    def _best_rows(self, sel_KTb: torch.Tensor, G: int, H: int) -> int:
        """Rows per group with the least modelled cost: per group, sum U * (G*R + H/8).

        G*R is the scoring per union key; H/8 is the gather and the memory-bound small-M
        matmul. Measured on one core (4K tokens, N=16, K=1, H=128): per-token groups (R=1)
        took 2.0x the block groups when every row of a block selects the same blocks, and
        0.9x when the block unions were 2.1x the per-token selection."""
        K, T, nb = sel_KTb.shape
        best = (float("inf"), self.bs)
        for R in sorted({self.bs, max(self.bs // 4, 1), max(self.bs // 16, 1), 1}, reverse=True):
            front = self.q_offset % R
            rows_KQRb = torch.nn.functional.pad(sel_KTb, (0, 0, front, (-front - T) % R))
            union = int(rows_KQRb.view(K, -1, R, nb).any(dim=2).sum())
            best = min(best, (union * (G * R + H / GATHER_COST), -R))
        return -best[1]

    def chunks(self, G: int, H: int):
        """Per chunk: q0, q1, the key rows of [K*S, H] to gather [K*C*L], the first maskable
        key column f, and the hidden-key mask [K, C, 1, R, L - f] of the columns from f on."""
        q0, U_max = 0, max(int(self.count_KQ.max()), 1)
        if self.chunk is None:
            C = max(1, SCORE_BUDGET // (self.K * max(G * self.R, 2 * H) * U_max * self.bs))
        else:
            C = max(1, self.chunk // self.R)
        while q0 < self.Q:
            q1 = min(self.Q, q0 + C)
            U = max(int(self.count_KQ[:, q0:q1].max()), 1)
            F = min(int(self.full_KQ[:, q0:q1].min()), U)
            blk_KCU = self.order_KQb[:, q0:q1, :U]
            # Only the columns after the chunk's first F (full) blocks can hide keys.
            part_KCU = blk_KCU[..., F:]
            shape_KCRU = (self.K, q1 - q0, self.R, U - F)
            sel_KCRU = self.sel_KQRb[:, q0:q1].gather(3, part_KCU[:, :, None].expand(shape_KCRU))
            key_KCUj = part_KCU[..., None] * self.bs + self.j_bs
            hide_KCRUj = (key_KCUj[:, :, None] > self.pos_QR[q0:q1, :, None, None]) \
                | ~sel_KCRU[..., None]
            hide_KC1RL = hide_KCRUj.view(self.K, q1 - q0, 1, self.R, (U - F) * self.bs)
            # Key rows past S only pad the last block; causality hides them.
            row_KCUj = (blk_KCU[..., None] * self.bs + self.j_bs).clamp_max(self.S - 1)
            yield q0, q1, (row_KCUj + self.head_off_K111).view(-1), F * self.bs, hide_KC1RL
            q0 = q1


def _rows(x_NTH: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[K, Q, G*R, H]: queries padded to whole row groups, the G heads of a group stacked."""
    N, T, H = x_NTH.shape
    x_NTH = torch.nn.functional.pad(x_NTH.float(), (0, 0, plan.front,
                                                    plan.Q * plan.R - plan.front - T))
    x_KGQRH = x_NTH.view(plan.K, N // plan.K, plan.Q, plan.R, H)
    return x_KGQRH.permute(0, 2, 1, 3, 4).reshape(plan.K, plan.Q, -1, H)


def _unrows(x_KQMH: torch.Tensor, plan: _Plan, N: int) -> torch.Tensor:
    """Inverse of `_rows`: [K, Q, G*R, H] -> [N, T, H]."""
    H = x_KQMH.shape[-1]
    x_KGQRH = x_KQMH.view(plan.K, plan.Q, N // plan.K, plan.R, H).permute(0, 2, 1, 3, 4)
    x_NTH = x_KGQRH.reshape(N, plan.Q * plan.R, H)
    return x_NTH[:, plan.front:plan.front + plan.T]


def _workspace(device: torch.device):
    """ws(name, *shape): fp32 buffers reused across the chunks of one call. A fresh large
    tensor page-faults on first touch: index_select into a new tensor ran at 1.3 GB/s here,
    into a reused one at 11-23 GB/s."""
    bufs: dict[str, torch.Tensor] = {}

    def ws(name: str, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, name = math.prod(shape), f"{name}:{dtype}"
        if name not in bufs or bufs[name].numel() < n:
            bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return bufs[name][:n].view(shape)
    return ws


def _gathered(ws, name: str, x_KSH: torch.Tensor, flat: torch.Tensor, K: int, C: int):
    """fp32 [K, C, L, H]: the chunk's union key (or value) rows, in a reused buffer. Only the
    gathered rows are converted, so a decode step costs O(selected keys), not O(S)."""
    x_RH = x_KSH.reshape(-1, x_KSH.shape[-1])
    out = torch.index_select(x_RH, 0, flat, out=ws(name, flat.numel(), x_RH.shape[1],
                                                    dtype=x_RH.dtype))
    if out.dtype != torch.float32:
        out = ws(name, *out.shape).copy_(out)
    return out.view(K, C, -1, x_RH.shape[1])


def _probs(ws, q_KCMH, k_KCLH, f: int, hide_KC1RL, G: int, lse_KCM1=None):
    """exp(scores - m) with hidden keys at 0, in the workspace; m = lse if given, else the row
    max (returned, 0 for rows with no visible key)."""
    K, C, M, _ = q_KCMH.shape
    L = k_KCLH.shape[2]
    s_KCML = torch.matmul(q_KCMH, k_KCLH.transpose(-1, -2), out=ws("s", K, C, M, L))
    s_KCML.view(K, C, G, M // G, L)[..., f:].masked_fill_(hide_KC1RL, float("-inf"))
    if lse_KCM1 is None:
        lse_KCM1 = s_KCML.amax(dim=-1, keepdim=True)
        lse_KCM1.masked_fill_(lse_KCM1 == float("-inf"), 0.0)  # rows with no visible key
    return s_KCML.sub_(lse_KCM1).exp_(), lse_KCM1


def _gather_forward(q_KQMH, k_KSH, v_KSH, plan: _Plan, G: int):
    """Masked softmax attention per chunk; returns out [K, Q, G*R, H], lse [K, Q, G*R, 1]."""
    K, Q, M, H = q_KQMH.shape
    out_KQMH = torch.empty_like(q_KQMH)
    lse_KQM1 = torch.empty(K, Q, M, 1, dtype=torch.float32, device=q_KQMH.device)
    ws = _workspace(q_KQMH.device)
    for q0, q1, flat, f, hide_KC1RL in plan.chunks(G, H):
        k_KCLH = _gathered(ws, "k", k_KSH, flat, K, q1 - q0)
        v_KCLH = _gathered(ws, "v", v_KSH, flat, K, q1 - q0)
        p_KCML, m_KCM1 = _probs(ws, q_KQMH[:, q0:q1], k_KCLH, f, hide_KC1RL, G)
        l_KCM1 = p_KCML.sum(dim=-1, keepdim=True)
        out_KQMH[:, q0:q1] = (p_KCML @ v_KCLH).div_(l_KCM1.clamp_min(1e-30))
        # +inf lse for empty rows makes the recomputed probabilities exactly 0 in backward.
        lse_KQM1[:, q0:q1] = torch.where(l_KCM1 > 0, m_KCM1 + l_KCM1.log(), float("inf"))
    return out_KQMH, lse_KQM1


def _gather_backward(q_KQMH, k_KSH, v_KSH, out_KQMH, lse_KQM1, dout_KQMH, plan: _Plan, G: int):
    K, Q, M, H = q_KQMH.shape
    dq_KQMH = torch.empty_like(q_KQMH)
    dk_RH = torch.zeros(k_KSH.numel() // H, H, dtype=torch.float32, device=k_KSH.device)
    dv_RH = torch.zeros_like(dk_RH)
    delta_KQM1 = (dout_KQMH * out_KQMH).sum(dim=-1, keepdim=True)
    ws = _workspace(q_KQMH.device)
    for q0, q1, flat, f, hide_KC1RL in plan.chunks(G, H):
        k_KCLH = _gathered(ws, "k", k_KSH, flat, K, q1 - q0)
        v_KCLH = _gathered(ws, "v", v_KSH, flat, K, q1 - q0)
        q_KCMH, do_KCMH = q_KQMH[:, q0:q1], dout_KQMH[:, q0:q1]
        p_KCML, _ = _probs(ws, q_KCMH, k_KCLH, f, hide_KC1RL, G, lse_KQM1[:, q0:q1])
        dv_KCLH = torch.matmul(p_KCML.transpose(-1, -2), do_KCMH, out=ws("dv", *k_KCLH.shape))
        ds_KCML = torch.matmul(do_KCMH, v_KCLH.transpose(-1, -2), out=ws("ds", *p_KCML.shape))
        ds_KCML.sub_(delta_KQM1[:, q0:q1]).mul_(p_KCML)
        dq_KQMH[:, q0:q1] = ds_KCML @ k_KCLH
        dk_KCLH = torch.matmul(ds_KCML.transpose(-1, -2), q_KCMH, out=ws("dk", *k_KCLH.shape))
        dk_RH.index_add_(0, flat, dk_KCLH.view(-1, H))
        dv_RH.index_add_(0, flat, dv_KCLH.view(-1, H))
    return dq_KQMH, dk_RH.view(K, -1, H), dv_RH.view(K, -1, H)


class _GatherAttention(torch.autograd.Function):
    """Block-gather attention for one sequence, with a memory-lean recomputing backward."""

    @staticmethod
    def forward(ctx, q_NTH, k_KSH, v_KSH, plan: _Plan):
        N, T, H = q_NTH.shape
        G, scale = N // plan.K, 1.0 / math.sqrt(H)
        q_KQMH = _rows(q_NTH, plan) * scale
        out_KQMH, lse_KQM1 = _gather_forward(q_KQMH, k_KSH, v_KSH, plan, G)
        ctx.save_for_backward(q_KQMH, k_KSH, v_KSH, out_KQMH, lse_KQM1)
        ctx.plan, ctx.meta = plan, (q_NTH.dtype, k_KSH.dtype, v_KSH.dtype, N, scale)
        return _unrows(out_KQMH, plan, N).to(q_NTH.dtype)

    @staticmethod
    def backward(ctx, dout_NTH):
        q_KQMH, k_KSH, v_KSH, out_KQMH, lse_KQM1 = ctx.saved_tensors
        plan, (qdt, kdt, vdt, N, scale) = ctx.plan, ctx.meta
        dout_KQMH = _rows(dout_NTH, plan)
        dq_KQMH, dk_KSH, dv_KSH = _gather_backward(q_KQMH, k_KSH, v_KSH, out_KQMH, lse_KQM1,
                                                   dout_KQMH, plan, N // plan.K)
        dq_NTH = (_unrows(dq_KQMH, plan, N) * scale).to(qdt)
        return dq_NTH, dk_KSH.to(kdt), dv_KSH.to(vdt), None


# ----------------------------------------------------------------------------- public API

def sparse_attention_reference(q_NTH, k_KSH, v_KSH, idx_KTk, *, block_size: int,
                               q_offset: int = 0) -> torch.Tensor:
    """Dense-mask fp32 softmax oracle; differentiable; rows with no visible key give 0."""
    return _batched(_reference_one, q_NTH, k_KSH, v_KSH, idx_KTk, block_size, q_offset)


def sparse_attention_gather(q_NTH, k_KSH, v_KSH, idx_KTk, *, block_size: int, q_offset: int = 0,
                            chunk: int | None = None, rows: str | int = "auto") -> torch.Tensor:
    """Union-of-blocks gather path (module doc), fp32 math, output in q's dtype.

    `rows` is the number of query rows that share one gathered union: "block" (block_size),
    "token" (1), an int, or "auto" (cost model). `chunk` is the number of query tokens per
    step, rounded down to whole groups and at least one group. With None, a step holds at
    most SCORE_BUDGET fp32 scores or gathered K/V elements. Differentiable w.r.t. q, k, v.
    """
    if rows not in ("auto", "block", "token") and not (isinstance(rows, int) and rows > 0):
        raise ValueError(f"rows must be 'auto', 'block', 'token' or an int > 0, got {rows!r}")

    def one(q_NTH, k_KSH, v_KSH, idx_KTk, block_size, q_offset):
        (N, T, H), (K, S, _) = q_NTH.shape, k_KSH.shape
        plan = _Plan(idx_KTk, T, S, N // K, H, block_size, q_offset, chunk, rows)
        return _GatherAttention.apply(q_NTH, k_KSH, v_KSH, plan)
    return _batched(one, q_NTH, k_KSH, v_KSH, idx_KTk, block_size, q_offset)


def sparse_attention(q_NTH, k_KSH, v_KSH, idx_KTk, *, block_size: int, q_offset: int = 0,
                     backend: str = "auto") -> torch.Tensor:
    """InfLLM v2 stage-2 attention, dispatched to a backend (module doc); output like q.

    Accepts per-sequence tensors q [N, T, H], k/v [K, S, H], idx [K, T, k] or the same with a
    leading batch dim. "auto" is "masked" for CPU training rows up to MASKED_MAX_SCORES,
    "cpp" for inference on CPU when the C++ kernel is built, else "gather". At 32K (same
    geometry as below, 2 threads, `benchmarks/sparse_attention.py`, idle machine) selection +
    C++ stage 2 took 11.69 s against dense causal SDPA's 29.42 s; at 16K the pure-PyTorch
    path (chunked selection + gather) was 3.65x slower than ours (a contended run). Earlier,
    gather against flex, measured with `benchmarks/sparse_stage2_probe.py` on this 2-core CPU
    at N=16, K=1, H=128, fp32, block 64, 96 blocks/query (steady state; compile excluded):
      8K, 1 thread (60.4 of 64.5 causal blocks): gather 5.0 s, flex 4.6 s, dense SDPA 3.9 s;
      8K, 1 thread, 24 blocks/query (21.8 of 64.5): gather 1.9-2.1 s, flex 1.8 s;
      16K, 2 threads, another process busy on both cores: flex 11.2 s, dense 14.1 s, and
      gather 35.2 s with 1 query block per chunk, 15.8 s after SCORE_BUDGET grew (10.5 s
      on 1 thread); fwd+bwd was gather 122.8 s (the old chunks), dense 50.2 s;
      decode at S=8K: gather 7-10 ms, flex 3 ms.
    Uncontended, the forward speeds are within ~10%. But flex compiles for 6-17 s per
    distinct (T, S): every new prompt length and every decode step recompiles, since
    dynamic=True fails to build. Flex also has no CPU backward. So one prefill including its
    compile is faster with gather.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown stage-2 backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        if masked_training(q_NTH, k_KSH, v_KSH):
            backend = "masked"
        elif stage2_cpp.available(q_NTH, k_KSH, v_KSH):
            backend = "cpp"
        else:
            backend = "gather"
    if backend == "cpp":
        return _batched(stage2_cpp.sparse_attention_cpp_one, q_NTH, k_KSH, v_KSH, idx_KTk,
                        block_size, q_offset)
    if backend == "masked":  # one fused SDPA with the selection as a dense mask (training)
        return _batched(lambda q, k, v, idx, bs, off: masked_one(
            q, k, v, block_mask_from_indices(idx, num_keys=k.shape[1], block_size=bs,
                                             q_offset=off)),
            q_NTH, k_KSH, v_KSH, idx_KTk, block_size, q_offset)
    if backend == "reference":
        return sparse_attention_reference(q_NTH, k_KSH, v_KSH, idx_KTk, block_size=block_size,
                                          q_offset=q_offset)
    if backend == "flex":
        return sparse_attention_flex(q_NTH, k_KSH, v_KSH, idx_KTk, block_size=block_size,
                                     q_offset=q_offset)
    return sparse_attention_gather(q_NTH, k_KSH, v_KSH, idx_KTk, block_size=block_size,
                                   q_offset=q_offset)
