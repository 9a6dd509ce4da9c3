// AVX-512 register-tiled inner loops of the C++ InfLLM v2 stage 2 (spec §2.2 step 6;
// sparse_attn.cpp is the driver, docs/kernels.md "C++ CPU kernels").
//
// The MKL path of sparse_attn.cpp packs, per run of key blocks, the queries of every row that
// picked the run into one matrix, so each run pays a gather of those queries, a product sized
// by how many rows share the run (a handful at 64K with random selections) and a scatter of
// the results into the rows' accumulators. Here each selecting row is instead processed on its
// own against 64-key chunks that stay in L1/L2 while all of that row group's rows use them:
//   S[G, 64] = Q_row[G, H] · Kt[H, 64]        (qk_tile: heads x 4 zmm of keys in registers)
//   online softmax per head, exp by exp512    (vectorised, masked to the causal/visible keys)
//   O_row[G, H] = alpha · O_row + P[G, 64] · V (pv_tile: heads x H/16 zmm in registers)
// Kt is K transposed per 64-key chunk (aligned to multiples of 64 positions), made once per
// call for prefills and per chunk for short calls (a decode step must not touch the cache).
// Head dims 16, 32, 64, 128 and 256; anything else takes the MKL path.
//
// Shape legend: G heads of a KV group, H head dim, C = 64 keys of a chunk.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

#include "avx512_math.h"

#include <algorithm>
#include <cstdint>

namespace minicpm4_avx512 {

constexpr int64_t kChunk = 64;  // keys per chunk: 4 zmm of scores per head

inline bool supports_head_dim(int64_t H) {
  return H == 16 || H == 32 || H == 64 || H == 128 || H == 256;
}

// s[i, 0:64] = q[i, :] · kt[:, 0:64] for HT heads (q rows at stride H, kt [H, 64]).
template <int HT>
inline void qk_tile(const float* q, int64_t H, const float* kt, float* s) {
  __m512 a[HT][4];
#pragma GCC unroll 8
  for (int i = 0; i < HT; ++i)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) a[i][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < H; ++d) {
    const float* kr = kt + d * kChunk;
    const __m512 k0 = _mm512_loadu_ps(kr), k1 = _mm512_loadu_ps(kr + 16);
    const __m512 k2 = _mm512_loadu_ps(kr + 32), k3 = _mm512_loadu_ps(kr + 48);
#pragma GCC unroll 8
    for (int i = 0; i < HT; ++i) {
      const __m512 qb = _mm512_set1_ps(q[i * H + d]);
      a[i][0] = _mm512_fmadd_ps(qb, k0, a[i][0]);
      a[i][1] = _mm512_fmadd_ps(qb, k1, a[i][1]);
      a[i][2] = _mm512_fmadd_ps(qb, k2, a[i][2]);
      a[i][3] = _mm512_fmadd_ps(qb, k3, a[i][3]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < HT; ++i)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + i * kChunk + c * 16, a[i][c]);
}

// o[i, 0:NV*16] = alpha[i] · o[i, 0:NV*16] + sum_{j in [lo, hi)} p[i, j] · v[j, 0:NV*16] for
// HT heads: one column slab (o rows at stride H, p [HT, 64], v rows at stride H).
template <int HT, int NV>
inline void pv_tile(const float* p, const float* v, int64_t H, int64_t lo, int64_t hi,
                    const float* alpha, float* o) {
  __m512 acc[HT][NV];
#pragma GCC unroll 8
  for (int i = 0; i < HT; ++i) {
    const __m512 al = _mm512_set1_ps(alpha[i]);
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[i][c] = _mm512_mul_ps(_mm512_loadu_ps(o + i * H + c * 16), al);
  }
  for (int64_t j = lo; j < hi; ++j) {
    const float* vr = v + j * H;
    __m512 vv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(vr + c * 16);
#pragma GCC unroll 8
    for (int i = 0; i < HT; ++i) {
      const __m512 pb = _mm512_set1_ps(p[i * kChunk + j]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[i][c] = _mm512_fmadd_ps(pb, vv[c], acc[i][c]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < HT; ++i)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + i * H + c * 16, acc[i][c]);
}

template <int HT>
inline void qk_heads(const float* q, int64_t H, const float* kt, float* s, int64_t G) {
  int64_t g = 0;
  for (; g + HT <= G; g += HT) qk_tile<HT>(q + g * H, H, kt, s + g * kChunk);
  switch (G - g) {  // tail
    case 5: qk_tile<5>(q + g * H, H, kt, s + g * kChunk); break;
    case 4: qk_tile<4>(q + g * H, H, kt, s + g * kChunk); break;
    case 3: qk_tile<3>(q + g * H, H, kt, s + g * kChunk); break;
    case 2: qk_tile<2>(q + g * H, H, kt, s + g * kChunk); break;
    case 1: qk_tile<1>(q + g * H, H, kt, s + g * kChunk); break;
    default: break;
  }
}

// All G heads, in column slabs of NV zmm (64 dims for H >= 64) and tiles of up to 6 heads.
template <int NV>
inline void pv_heads(const float* p, const float* v, int64_t H, int64_t lo, int64_t hi,
                     const float* alpha, float* o, int64_t G) {
  for (int64_t c0 = 0; c0 < H; c0 += NV * 16) {
    int64_t g = 0;
    for (; g + 6 <= G; g += 6)
      pv_tile<6, NV>(p + g * kChunk, v + c0, H, lo, hi, alpha + g, o + g * H + c0);
    const float *pg = p + g * kChunk, *ag = alpha + g;
    float* og = o + g * H + c0;
    switch (G - g) {  // tail
      case 5: pv_tile<5, NV>(pg, v + c0, H, lo, hi, ag, og); break;
      case 4: pv_tile<4, NV>(pg, v + c0, H, lo, hi, ag, og); break;
      case 3: pv_tile<3, NV>(pg, v + c0, H, lo, hi, ag, og); break;
      case 2: pv_tile<2, NV>(pg, v + c0, H, lo, hi, ag, og); break;
      case 1: pv_tile<1, NV>(pg, v + c0, H, lo, hi, ag, og); break;
      default: break;
    }
  }
}

// One row (all G heads) against one chunk: keys [lo, hi) of the chunk are this row's
// (selected and causally visible). Updates the row's running max m[G], sum l[G] and
// accumulator o[G, H]. s is scratch [G, 64]; q is the row's scaled queries [G, H].
inline void row_chunk(const float* q, const float* kt, const float* v, int64_t lo, int64_t hi,
                      int64_t G, int64_t H, float* s, float* alpha, float* m, float* l,
                      float* o) {
  qk_heads<6>(q, H, kt, s, G);
  const __mmask16 full = 0xFFFF;
  __mmask16 mk[4];
  for (int c = 0; c < 4; ++c) {
    const int64_t a = std::clamp<int64_t>(lo - c * 16, 0, 16);
    const int64_t b = std::clamp<int64_t>(hi - c * 16, 0, 16);
    mk[c] = b > a ? __mmask16(((full >> (16 - (b - a))) << a) & full) : __mmask16(0);
  }
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  for (int64_t g = 0; g < G; ++g) {
    float* srow = s + g * kChunk;
    __m512 x[4];
    __m512 mx = ninf;
    for (int c = 0; c < 4; ++c) {
      x[c] = _mm512_mask_loadu_ps(ninf, mk[c], srow + c * 16);
      mx = _mm512_max_ps(mx, x[c]);
    }
    const float m_old = m[g];
    const float m_new = std::max(m_old, _mm512_reduce_max_ps(mx));
    const __m512 mn = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      const __m512 pc = _mm512_maskz_mov_ps(mk[c], exp512(_mm512_sub_ps(x[c], mn)));
      _mm512_storeu_ps(srow + c * 16, pc);
      sum = _mm512_add_ps(sum, pc);
    }
    const float a = m_old == -__builtin_inff() ? 0.f : std::exp(m_old - m_new);
    alpha[g] = a;
    l[g] = l[g] * a + _mm512_reduce_add_ps(sum);
    m[g] = m_new;
  }
  switch (H) {
    case 16: pv_heads<1>(s, v, H, lo, hi, alpha, o, G); break;
    case 32: pv_heads<2>(s, v, H, lo, hi, alpha, o, G); break;
    default: pv_heads<4>(s, v, H, lo, hi, alpha, o, G); break;  // 64, 128, 256
  }
}

// kt[d, j] = k[j, d] for the n <= 64 keys of a chunk, zero beyond n (fp32 out).
template <typename scalar_t>
inline void transpose_chunk(const scalar_t* k, int64_t n, int64_t H, float* kt) {
  for (int64_t d = 0; d < H; ++d) {
    float* dst = kt + d * kChunk;
    for (int64_t j = 0; j < n; ++j) dst[j] = float(k[j * H + d]);
    for (int64_t j = n; j < kChunk; ++j) dst[j] = 0.f;
  }
}

}  // namespace minicpm4_avx512

#endif  // __AVX512F__
