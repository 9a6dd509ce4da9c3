// Small AVX-512 helpers shared by the CPU kernels: bf16 -> fp32 widening (greedy.cpp,
// paged_attention.cpp), a 16 x 16 transpose of 32-bit lanes (the
// AMX skinny GEMM's fp32 result blocks, skinny_gemm_amx.h; 16 keys' bf16 pairs in the paged
// decode attention, paged_attention.cpp) and a lane-wise exp (the softmax of the paged
// decode attention and of InfLLM v2's stage 2, sparse_attn_avx512.h).

#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

// 16 bf16 values -> 16 fp32 lanes (bf16 is the high half of an fp32).
inline __m512 widen_bf16x16(const void* p) {
  const __m256i b = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// In-register transpose of a 16 x 16 fp32 block: r[i] = row i in, r[j] = column j out.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4 i + c], 128-bit block b = rows 4 i .. 4 i + 3 of column c + 4 b
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  constexpr int kEven = _MM_SHUFFLE(2, 0, 2, 0), kOdd = _MM_SHUFFLE(3, 1, 3, 1);
  for (int c = 0; c < 4; ++c) {  // gather the four row groups of columns c, c+4, c+8, c+12
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], kEven);
    t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], kOdd);
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], kEven);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], kOdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], kEven);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[8 + c], kOdd);
    r[c + 4] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], kEven);
    r[c + 12] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], kOdd);
  }
}

// exp(x) lane-wise (Cephes expf: 2^n · (1 + f + f^2 P(f)), |f| <= ln2/2); x is clamped to
// [-87, 88], callers zero the lanes that must be exactly 0.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

#endif
