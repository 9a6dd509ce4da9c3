"""Triton kernels of InfLLM v2 stage 2 (spec §2.2 step 6): block-sparse attention fwd + bwd.

Imported lazily by `triton_kernels.sparse_attention_triton` (needs triton). Tensors are
batched and contiguous: q [B, N, T, H], k/v [B, K, S, H], idx [B, K, T, k].

Host-side canonical indices (`_canonical`): per row the valid ids (0 <= b <= the query's
block, duplicates dropped) ascending, then padding; `cnt` = number of valid ids. So the
kernels loop over exactly `cnt` blocks and never re-check ids.

- Forward (`_fwd_kernel`), grid (cdiv(T, RT), K, B). With RT = 1 (default) the query tile is
  one token x the G heads of its KV group (padded to >= 16 rows for the tensor cores), as in
  the paper's App. A: the G heads share each K/V block load and the loop visits exactly the
  token's blocks. With RT > 1 (`tokens_per_tile`) a tile holds RT consecutive tokens x G
  heads and visits the union of their blocks (`_tiles`); a per-token bitmask of selected
  blocks masks the rows that did not pick a block. FlashAttention-2 online softmax in base
  2, fp32 accumulators; the causal test `key <= q_offset + t` only bites on the diagonal
  block. Stores out and the natural-log LSE (+inf for a row with no visible key; out 0).
- Backward, no atomics for dq, few for dk/dv:
  * `_dq_kernel`, same tiles and loop as the forward: recomputes P from the LSE, dS =
    P * (dO V^T - delta), dq = scale * dS K.
  * `_dkdv_kernel`, KV-block major: the host inverts the selection into a CSR list of
    (batch, kv head, block) -> query tokens that selected it, split into segments of at most
    `seg_tokens` tokens (the sink and local blocks are picked by up to T tokens; splitting
    keeps programs balanced). One program per segment loads its K/V block once, sweeps its
    tokens BLOCK_Q at a time (BLOCK_Q tokens x G heads rows), accumulates dk/dv in fp32
    registers and adds them once into fp32 dk/dv buffers with `tl.atomic_add` (only blocks
    split into several segments see contention; the sum order across segments is
    nondeterministic).
"""

import math

import torch
import triton
import triton.language as tl

from minicpm4.kernels.infllm_v2.triton_kernels import upcast_dots

LOG2E = 1.4426950408889634
SEG_TOKENS = 2048  # default max query tokens per dk/dv program
# Launch options per kernel for 16-bit inputs: untuned guesses, checked only by compiling for
# sm_90 with ptxas (bf16, G=16, H=128, bs=64): no spills; num_stages 3 pushes fwd to 255
# registers, 2 keeps it at 128. fp32 inputs (a test path) use num_stages 1 so that the 3xTF32
# operand copies fit H100 shared memory (<= 192 KiB).
LAUNCH = {"fwd": dict(num_warps=4, num_stages=2), "dq": dict(num_warps=4, num_stages=2),
          "dkdv": dict(num_warps=8, num_stages=2)}


def _opts(name: str, dtype: torch.dtype) -> dict:
    return {**LAUNCH[name], **({"num_stages": 1} if dtype == torch.float32 else {})}


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    """a @ b, fp32 accumulation. UPCAST: fp32 operands, 3xTF32 on the tensor cores (about
    fp32 accuracy; the interpreter computes plain fp32). Else a is cast to b's dtype."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        return tl.dot(a.to(b.dtype), b)


@triton.jit
def _tile(T, N, G: tl.constexpr, BLOCK_G: tl.constexpr, RT: tl.constexpr):
    """Rows of this program: RT tokens x BLOCK_G heads (heads >= G and tokens >= T masked)."""
    kh = tl.program_id(1)
    bz = tl.program_id(2)
    offs_m = tl.arange(0, RT * BLOCK_G)
    tok = tl.program_id(0) * RT + offs_m // BLOCK_G
    g = offs_m % BLOCK_G
    r_ok = (tok < T) & (g < G)
    rows = (bz * N + kh * G + g).to(tl.int64) * T + tok
    return kh, bz, tok, r_ok, rows


@triton.jit
def _visible(blk, keys, pos, pos_max, r_ok, BITS, bit_rows, W, RT: tl.constexpr):
    """Mask [M or 1, BS]: causal, and (tiles of several tokens) the row's token selected
    blk. One token: its blocks are exactly the loop's, only the diagonal needs a mask."""
    if RT == 1:
        vis = (keys <= pos_max)[None, :]
    else:
        vis = r_ok[:, None] & (keys[None, :] <= pos[:, None])
        word = tl.load(BITS + bit_rows * W + blk // 32, mask=r_ok, other=0)
        vis = vis & (((word >> (blk % 32)) & 1) != 0)[:, None]
    return vis


@triton.jit
def _query_tile(Q, CNT, T, N, K, q_offset, G: tl.constexpr, BLOCK_G: tl.constexpr,
                RT: tl.constexpr, H: tl.constexpr):
    """The program's query rows (RT tokens x G heads), their positions, their q [rows, H],
    and where their shared block list starts (sel) and how long it is (cnt)."""
    kh, bz, tok, r_ok, rows = _tile(T, N, G, BLOCK_G, RT)
    pos = q_offset + tok
    pos_max = q_offset + tl.minimum(tl.program_id(0) * RT + RT, T) - 1
    offs_h = tl.arange(0, H)
    rh = rows[:, None] * H + offs_h[None, :]
    q = tl.load(Q + rh, mask=r_ok[:, None], other=0.0)
    bk = (bz * K + kh).to(tl.int64)
    sel = bk * tl.cdiv(T, RT) + tl.program_id(0)
    cnt = tl.load(CNT + sel)
    return tok, r_ok, rows, pos, pos_max, offs_h, rh, q, bk, sel, cnt


@triton.jit
def _block_keys(IDX, sel, s, bk, S, pos_max, offs_h, KT, H: tl.constexpr, BS: tl.constexpr):
    """The s-th selected block of a tile: its id, key positions, which keys exist for the
    tile (<= its last position) and the K/V offsets of its rows."""
    blk = tl.load(IDX + sel * KT + s)
    keys = blk * BS + tl.arange(0, BS)
    k_ok = (keys <= pos_max)[:, None]
    kv = (bk * S + keys)[:, None] * H + offs_h[None, :]
    return blk, keys, k_ok, kv


@triton.jit
def _fwd_kernel(Q, Kp, V, IDX, CNT, BITS, O, LSE, N, K, T, S, KT, W, q_offset, qk_scale,
                G: tl.constexpr, BLOCK_G: tl.constexpr, RT: tl.constexpr, H: tl.constexpr,
                BS: tl.constexpr, UPCAST: tl.constexpr):
    tok, r_ok, rows, pos, pos_max, offs_h, rh, q, bk, sel, cnt = _query_tile(
        Q, CNT, T, N, K, q_offset, G, BLOCK_G, RT, H)
    m_i = tl.full([RT * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([RT * BLOCK_G], tl.float32)
    acc = tl.zeros([RT * BLOCK_G, H], tl.float32)
    for s in range(0, cnt):
        blk, keys, k_ok, kv = _block_keys(IDX, sel, s, bk, S, pos_max, offs_h, KT, H, BS)
        k = tl.load(Kp + kv, mask=k_ok, other=0.0)
        vis = _visible(blk, keys, pos, pos_max, r_ok, BITS, bk * T + tok, W, RT)
        qk = tl.where(vis, _mm(q, tl.trans(k), UPCAST) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv, mask=k_ok, other=0.0)
        acc = acc * alpha[:, None] + _mm(p, v, UPCAST)
        m_i = m_new
    ok = l_i > 0
    out = acc / tl.where(ok, l_i, 1.0)[:, None]
    tl.store(O + rh, out.to(O.dtype.element_ty), mask=r_ok[:, None])
    lse = tl.where(ok, (m_i + tl.log2(tl.where(ok, l_i, 1.0))) * 0.6931471805599453,
                   float("inf"))
    tl.store(LSE + rows, lse, mask=r_ok)


@triton.jit
def _dq_kernel(Q, Kp, V, IDX, CNT, BITS, DO, LSE, DELTA, DQ, N, K, T, S, KT, W, q_offset,
               qk_scale, sm_scale, G: tl.constexpr, BLOCK_G: tl.constexpr, RT: tl.constexpr,
               H: tl.constexpr, BS: tl.constexpr, UPCAST: tl.constexpr):
    tok, r_ok, rows, pos, pos_max, offs_h, rh, q, bk, sel, cnt = _query_tile(
        Q, CNT, T, N, K, q_offset, G, BLOCK_G, RT, H)
    do = tl.load(DO + rh, mask=r_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + rows, mask=r_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + rows, mask=r_ok, other=0.0)
    dq = tl.zeros([RT * BLOCK_G, H], tl.float32)
    for s in range(0, cnt):
        blk, keys, k_ok, kv = _block_keys(IDX, sel, s, bk, S, pos_max, offs_h, KT, H, BS)
        k = tl.load(Kp + kv, mask=k_ok, other=0.0)
        v = tl.load(V + kv, mask=k_ok, other=0.0)
        vis = _visible(blk, keys, pos, pos_max, r_ok, BITS, bk * T + tok, W, RT)
        qk = _mm(q, tl.trans(k), UPCAST) * qk_scale
        p = tl.where(vis, tl.exp2(qk - lse2[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds, k, UPCAST)
    tl.store(DQ + rh, (dq * sm_scale).to(DQ.dtype.element_ty), mask=r_ok[:, None])


@triton.jit
def _dkdv_kernel(Q, Kp, V, DO, LSE, DELTA, SEG_KEY, SEG_START, SEG_END, TOK, DK, DV,
                 N, K, T, S, NB, q_offset, qk_scale, sm_scale, G: tl.constexpr,
                 BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, H: tl.constexpr,
                 BS: tl.constexpr, UPCAST: tl.constexpr):
    seg = tl.program_id(0)
    key = tl.load(SEG_KEY + seg).to(tl.int64)  # (bz * K + kh) * NB + blk
    start = tl.load(SEG_START + seg)
    end = tl.load(SEG_END + seg)
    blk = key % NB
    bk = key // NB
    bz = bk // K
    kh = bk % K
    offs_h = tl.arange(0, H)
    keys = blk * BS + tl.arange(0, BS)
    k_ok = keys < S
    kv = (bk * S + keys)[:, None] * H + offs_h[None, :]
    k = tl.load(Kp + kv, mask=k_ok[:, None], other=0.0)
    v = tl.load(V + kv, mask=k_ok[:, None], other=0.0)
    offs_m = tl.arange(0, BLOCK_Q * BLOCK_G)
    r_tok = offs_m // BLOCK_G
    r_g = offs_m % BLOCK_G
    dk = tl.zeros([BS, H], tl.float32)
    dv = tl.zeros([BS, H], tl.float32)
    for i in range(start, end, BLOCK_Q):
        ti = i + r_tok
        r_ok = (ti < end) & (r_g < G)
        t = tl.load(TOK + ti, mask=r_ok, other=0)
        rows = (bz * N + kh * G + r_g).to(tl.int64) * T + t
        rh = rows[:, None] * H + offs_h[None, :]
        q = tl.load(Q + rh, mask=r_ok[:, None], other=0.0)
        do = tl.load(DO + rh, mask=r_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + rows, mask=r_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + rows, mask=r_ok, other=0.0)
        qk = _mm(q, tl.trans(k), UPCAST) * qk_scale
        vis = r_ok[:, None] & (keys[None, :] <= (q_offset + t)[:, None])
        p = tl.where(vis, tl.exp2(qk - lse2[:, None]), 0.0)
        dv += _mm(tl.trans(p), do, UPCAST)
        dp = _mm(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _mm(tl.trans(ds), q, UPCAST)
    tl.atomic_add(DK + kv, dk * sm_scale, mask=k_ok[:, None])
    tl.atomic_add(DV + kv, dv, mask=k_ok[:, None])


def _dedupe(s, nb: int):
    """Rows of ids (nb = empty) -> distinct ids ascending, then nb; and their count."""
    s = s.sort(-1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[..., 1:] = s[..., 1:] == s[..., :-1]
    s = torch.where(dup, nb, s).sort(-1).values
    return s, (s < nb).sum(-1).to(torch.int32).contiguous()


def _canonical(idx, T: int, block_size: int, q_offset: int, nb: int):
    """(ids [B, K, T, k] int64, nb = empty; cnt int32 [B, K, T]): per query its valid
    (0 <= b <= own block) distinct ids first, ascending."""
    pos_T1 = (q_offset + torch.arange(T, device=idx.device))[:, None]
    ids = idx.long()
    return _dedupe(torch.where((ids >= 0) & (ids <= pos_T1 // block_size), ids, nb), nb)


def _tiles(ids, cnt, nb: int, rt: int):
    """Per tile of rt tokens: (union ids int32 [B, K, NT, rt*k], count [B, K, NT], selection
    bits int32 [B, K, T, W] (bit b % 32 of word b // 32: the token selected block b), W)."""
    if rt == 1:
        return ids.to(torch.int32).contiguous(), cnt, cnt, 1
    B, K, T, k = ids.shape
    NT, W = -(-T // rt), -(-nb // 32)
    padded = torch.nn.functional.pad(ids, (0, 0, 0, NT * rt - T), value=nb)
    union, ucnt = _dedupe(padded.view(B, K, NT, rt * k), nb)
    valid = torch.arange(k, device=ids.device) < cnt[..., None]
    word = torch.where(valid, ids // 32, W)
    bit = torch.where(valid, torch.ones_like(ids) << (ids % 32), 0)
    bits = torch.zeros(B, K, T, W + 1, dtype=torch.int64, device=ids.device)
    bits = bits.scatter_add_(-1, word, bit)[..., :W]
    bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits)  # two's complement int32
    return union.to(torch.int32).contiguous(), ucnt, bits.to(torch.int32).contiguous(), W


def _segments(ids, cnt, nb: int, seg_tokens: int):
    """CSR of the selection by KV block, cut into segments of <= seg_tokens query tokens:
    (seg_key, seg_start, seg_end, tok), int32; key = (b * K + kh) * nb + block."""
    B, K, T, k = ids.shape
    dev = ids.device
    valid = torch.arange(k, device=dev) < cnt[..., None]
    bk = torch.arange(B * K, device=dev).view(B, K, 1, 1)
    keys = (bk * nb + ids)[valid]
    tok = torch.arange(T, device=dev).view(1, 1, T, 1).expand(B, K, T, k)[valid]
    keys, order = keys.sort(stable=True)
    tok = tok[order]
    per_key = torch.bincount(keys, minlength=B * K * nb)
    key_start = per_key.cumsum(0) - per_key
    seg_per = -(-per_key // seg_tokens)
    seg_key = torch.repeat_interleave(torch.arange(B * K * nb, device=dev), seg_per)
    seg_first = seg_per.cumsum(0) - seg_per
    start = key_start[seg_key] + (torch.arange(len(seg_key), device=dev)
                                  - seg_first[seg_key]) * seg_tokens
    end = torch.minimum(start + seg_tokens, key_start[seg_key] + per_key[seg_key])
    as32 = (lambda x: x.to(torch.int32).contiguous())
    return as32(seg_key), as32(start), as32(end), as32(tok)


def _block_g(G: int, rt: int) -> int:
    """Head rows per token: G padded to a power of two, and the tile to >= 16 rows (dot)."""
    return max(triton.next_power_of_2(G), 16 // rt)


def _check_shapes(H: int, block_size: int, rt: int) -> None:
    if H & (H - 1) or H < 16 or block_size & (block_size - 1) or block_size < 16:
        raise ValueError(f"the Triton kernels need a power-of-two head dim >= 16 and block size "
                         f">= 16, got head dim {H}, block size {block_size}")
    if rt < 1 or rt & (rt - 1):
        raise ValueError(f"tokens_per_tile must be a power of two >= 1, got {rt}")


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, block_size, q_offset, seg_tokens, rt):
        B, N, T, H = q.shape
        K, S = k.shape[1], k.shape[2]
        _check_shapes(H, block_size, rt)
        nb = -(-S // block_size)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        ids, cnt = _canonical(idx, T, block_size, q_offset, nb)
        tiles = _tiles(ids, cnt, nb, rt)
        out = torch.empty_like(q)
        lse = torch.empty(B, N, T, dtype=torch.float32, device=q.device)
        scale = 1.0 / math.sqrt(H)
        if T:
            union, ucnt, bits, W = tiles
            _fwd_kernel[(-(-T // rt), K, B)](
                q, k, v, union, ucnt, bits, out, lse, N, K, T, S, union.shape[-1], W, q_offset,
                scale * LOG2E, G=N // K, BLOCK_G=_block_g(N // K, rt), RT=rt, H=H,
                BS=block_size, UPCAST=upcast_dots(q.dtype), **_opts("fwd", q.dtype))
        ctx.save_for_backward(q, k, v, ids, cnt, out, lse, *tiles[:3])
        ctx.meta = (block_size, q_offset, seg_tokens or SEG_TOKENS, rt, tiles[3])
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, ids, cnt, out, lse, union, ucnt, bits = ctx.saved_tensors
        block_size, q_offset, seg_tokens, rt, W = ctx.meta
        B, N, T, H = q.shape
        K, S = k.shape[1], k.shape[2]
        G, nb = N // K, -(-S // block_size)
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)
        scale = 1.0 / math.sqrt(H)
        common = dict(G=G, H=H, BS=block_size, UPCAST=upcast_dots(q.dtype))
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
        if T:
            _dq_kernel[(-(-T // rt), K, B)](
                q, k, v, union, ucnt, bits, dout, lse, delta, dq, N, K, T, S, union.shape[-1],
                W, q_offset, scale * LOG2E, scale, BLOCK_G=_block_g(G, rt), RT=rt,
                **_opts("dq", q.dtype), **common)
            seg_key, start, end, tok = _segments(ids, cnt, nb, seg_tokens)
            if len(seg_key):
                gp = triton.next_power_of_2(G)  # rows: BLOCK_Q tokens x gp heads, >= 32
                _dkdv_kernel[(len(seg_key),)](q, k, v, dout, lse, delta, seg_key, start, end,
                                              tok, dk, dv, N, K, T, S, nb, q_offset,
                                              scale * LOG2E, scale, BLOCK_G=gp,
                                              BLOCK_Q=max(1, 32 // gp), **_opts("dkdv", q.dtype),
                                              **common)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def sparse_attention_fn(q, k, v, idx, block_size: int, q_offset: int, seg_tokens,
                        tokens_per_tile: int = 1):
    """Batched entry: (out [B, N, T, H] like q, lse fp32 [B, N, T])."""
    if seg_tokens is not None and seg_tokens <= 0:
        raise ValueError(f"seg_tokens must be positive, got {seg_tokens}")
    k, v = k.to(q.dtype), v.to(q.dtype)  # the kernels take one dtype (casts are autograd ops)
    return _SparseAttention.apply(q, k, v, idx, block_size, q_offset, seg_tokens,
                                  tokens_per_tile)
