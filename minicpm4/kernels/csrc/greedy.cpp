// Greedy token choice over a batch of logits rows, bf16 or fp32 (issue 5, sampling cost).
//
// For greedy rows the engine needs only the index of each row's maximum, but widening a
// [B, 73448] bf16 logits batch to fp32 and reducing it with torch (single-threaded on CPU)
// costs ~0.8 ms per decode step at B = 32. This scans the rows in their own dtype, split
// between torch's threads: the first index of the maximum, a NaN counting as the maximum
// (its first index), as torch.max(dim).indices answers.
// Shape legend: B rows, V vocabulary.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>

#include "avx512_math.h"
#endif

namespace {

// NaN test on the bits: the extensions build with -ffast-math, under which std::isnan may
// be folded to false.
inline bool is_nan(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x7fffffffu) > 0x7f800000u;
}

template <typename T>
int64_t row_argmax_scalar(const T* x_V, int64_t V) {
  int64_t best = 0;
  float best_v = static_cast<float>(x_V[0]);
  if (is_nan(best_v)) return 0;
  for (int64_t v = 1; v < V; ++v) {
    const float f = static_cast<float>(x_V[v]);
    if (is_nan(f)) return v;
    if (f > best_v) {
      best_v = f;
      best = v;
    }
  }
  return best;
}

#if defined(__AVX512F__)
// 16 values of the row from element v on, as fp32 lanes.
inline __m512 load16(const float* x, int64_t v) { return _mm512_loadu_ps(x + v); }
inline __m512 load16(const c10::BFloat16* x, int64_t v) { return widen_bf16x16(x + v); }

// Two vector passes: the maximum (and whether any NaN is present, tested on the bits), then
// the first index holding it. A row with a NaN goes to the scalar scan (first NaN).
template <typename T>
int64_t row_argmax(const T* x_V, int64_t V) {
  const int64_t full = V / 16 * 16;
  if (full == 0) return row_argmax_scalar(x_V, V);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf_bits = _mm512_set1_epi32(0x7f800000);
  // four independent running maxima (one chain of dependent max would bound the pass at
  // its latency per 16 values)
  __m512 vmax[4] = {load16(x_V, 0), load16(x_V, 0), load16(x_V, 0), load16(x_V, 0)};
  __mmask16 nan = 0;
  int64_t v = 0;
  for (; v + 64 <= full; v += 64) {
    for (int u = 0; u < 4; ++u) {
      const __m512 f = load16(x_V, v + 16 * u);
      const __m512i bits = _mm512_and_si512(_mm512_castps_si512(f), abs_mask);
      nan |= _mm512_cmpgt_epi32_mask(bits, inf_bits);
      vmax[u] = _mm512_max_ps(vmax[u], f);
    }
  }
  for (; v < full; v += 16) {
    const __m512 f = load16(x_V, v);
    const __m512i bits = _mm512_and_si512(_mm512_castps_si512(f), abs_mask);
    nan |= _mm512_cmpgt_epi32_mask(bits, inf_bits);
    vmax[0] = _mm512_max_ps(vmax[0], f);
  }
  float mx = _mm512_reduce_max_ps(
      _mm512_max_ps(_mm512_max_ps(vmax[0], vmax[1]), _mm512_max_ps(vmax[2], vmax[3])));
  for (v = full; v < V; ++v) {
    const float f = static_cast<float>(x_V[v]);
    if (is_nan(f)) nan = 1;
    mx = f > mx ? f : mx;
  }
  if (nan) return row_argmax_scalar(x_V, V);
  const __m512 target = _mm512_set1_ps(mx);
  for (int64_t v = 0; v < full; v += 16) {
    const __mmask16 eq = _mm512_cmp_ps_mask(load16(x_V, v), target, _CMP_EQ_OQ);
    if (eq) return v + __builtin_ctz(static_cast<unsigned>(eq));
  }
  for (int64_t v = full; v < V; ++v)
    if (static_cast<float>(x_V[v]) == mx) return v;
  return row_argmax_scalar(x_V, V);  // not reached
}
#else
template <typename T>
int64_t row_argmax(const T* x_V, int64_t V) { return row_argmax_scalar(x_V, V); }
#endif

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), "argmax_rows: a CPU tensor is expected");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0,
              "argmax_rows: logits [B, V] with V > 0 expected, got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat,
              "argmax_rows: bfloat16 or float32 logits expected");
  const at::Tensor x = logits.contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      op[b] = x.scalar_type() == at::kBFloat16
                  ? row_argmax(x.data_ptr<c10::BFloat16>() + b * V, V)
                  : row_argmax(x.data_ptr<float>() + b * V, V);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(minicpm4_greedy, m) {
  m.def("argmax_rows(Tensor logits) -> Tensor", &argmax_rows);
}
