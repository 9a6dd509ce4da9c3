// Skinny bf16 GEMM for CPU decoding: y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]), M small.
//
// Issue 5, acceptance item 5 (decode throughput >= 2x transformers at equal batch); see
// minicpm4/kernels/skinny_linear.py for the dispatcher, the cut-over and the measurements.
// A decode step reads every weight once, so it is bound by how fast the weights stream
// from memory. torch's bf16 GEMM for M = 1..32 rows reaches 4-9 GB/s of weights on the
// project's AVX-512 EPYC machines; this kernel streams the nn.Linear weight in its own
// [N, K] row-major layout (no repacked copy), fp32 accumulation with AVX-512 BF16
// `vdpbf16ps` (two bf16 products summed into each fp32 lane per instruction), one rounding
// to bf16 at the end.
//
// Work split: N is cut into tiles of kTileN weight rows, shared between threads with
// at::parallel_for (it follows torch.set_num_threads). A register tile is kTileN weight
// rows x up to kTileM activation rows, 16 fp32 accumulators (one zmm each) over the whole
// K; the tile's weight rows are re-read from L1/L2 for each group of kTileM activation rows,
// and the rows two tiles ahead are prefetched meanwhile (M >= 2). The 16 sums of a tile are
// reduced together (a transpose-and-add tree), + bias, rounded to bf16 once.
// K tails (K % 32) use masked loads (zero-filled lanes add nothing).
//
// On CPUs with AMX-BF16, calls with K % 32 == 0 run on the tile unit instead
// (skinny_gemm_amx.h); `linear_avx512` is this file's vector path on any shape.
// Without AVX-512 BF16 at compile time (-march=native on another CPU), `linear` runs the
// portable loop, which is always compiled and also registered as `linear_portable`, so that
// tests can check it on any machine.
// Shape legend: M activation rows, N output features (weight rows), K inner dimension.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTileN = 4;  // weight rows per register tile
constexpr int64_t kTileM = 4;  // activation rows per register tile
// Software prefetch distance, in tiles, for M >= 2 (measured, 0.5B / demo shapes, weights
// cycled beyond the LLC: M = 8 1.3-1.5x faster than without; at M = 1 the hardware
// prefetcher alone is as fast).
constexpr int64_t kPrefetchTiles = 2;
constexpr int64_t kMinWorkPerThread = 1 << 16;  // weight elements: below this, no new thread

inline float bf16_bits_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  // c10::BFloat16's round-to-nearest-even (NaN kept as NaN).
  return c10::BFloat16(f).x;
}

struct Problem {
  const uint16_t* x_MK;
  const uint16_t* w_NK;
  const uint16_t* bias_N;  // nullptr: no bias
  uint16_t* y_MN;
  int64_t M, N, K;
};

// Writes y[m0 + r, n0 + j] = acc[r * kTileN + j] (+ bias) for r < rows, j < cols.
inline void store_tile(const Problem& p, const float* acc, int64_t m0, int64_t rows, int64_t n0,
                       int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* y = p.y_MN + (m0 + r) * p.N + n0;
    for (int64_t j = 0; j < cols; ++j) {
      float v = acc[r * kTileN + j];
      if (p.bias_N != nullptr) v += bf16_bits_to_float(p.bias_N[n0 + j]);
      y[j] = float_to_bf16_bits(v);
    }
  }
}

// ---------------------------------------------------------------- portable path
// Weight rows [n_begin, n_end): each weight row is widened to fp32 once and dotted with the
// (already widened) activation rows; the compiler vectorises the inner loops.
void portable_rows(const Problem& p, const float* xf_MK, int64_t n_begin, int64_t n_end) {
  std::vector<float> wf_K(static_cast<size_t>(p.K));
  float acc[kTileM * kTileN];
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint16_t* w = p.w_NK + n * p.K;
    for (int64_t k = 0; k < p.K; ++k) wf_K[k] = bf16_bits_to_float(w[k]);
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xr = xf_MK + m * p.K;
      float s = 0.f;
      for (int64_t k = 0; k < p.K; ++k) s += xr[k] * wf_K[k];
      acc[0] = s;
      store_tile(p, acc, m, 1, n, 1);
    }
  }
}

void run_portable(const Problem& p) {
  std::vector<float> xf_MK(static_cast<size_t>(p.M * p.K));
  for (int64_t i = 0; i < p.M * p.K; ++i) xf_MK[i] = bf16_bits_to_float(p.x_MK[i]);
  int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(p.K, 1));
  at::parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) {
    portable_rows(p, xf_MK.data(), n0, n1);
  });
}

// ---------------------------------------------------------------- AVX-512 BF16 path
#if defined(__AVX512BF16__)

inline __m512bh load_bh(const uint16_t* ptr) {
  return (__m512bh)_mm512_loadu_si512(static_cast<const void*>(ptr));
}

inline __m512bh load_bh_masked(const uint16_t* ptr, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, static_cast<const void*>(ptr));
}

// acc_out[r * kTileN + j] = dot(x row r, weight row j) over all K, for R activation rows
// starting at x_RK (row stride K) and the kTileN weight rows w[j]. With Prefetch, also
// prefetches the weight rows kPrefetchTiles tiles further on (rows are contiguous; a
// prefetch past the end of the weight is harmless).
template <int R, bool Prefetch>
inline void tile_dot(const uint16_t* x_RK, const uint16_t* const* w, int64_t K, float* acc_out) {
  __m512 acc[kTileM][kTileN];  // rows >= R stay zero (they feed the reduction below)
#pragma GCC unroll 4
  for (int r = 0; r < kTileM; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < kTileN; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (Prefetch) {  // the same 64 bytes of the rows kPrefetchTiles tiles ahead
#pragma GCC unroll 4
      for (int j = 0; j < kTileN; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w[j] + kPrefetchTiles * kTileN * K + k),
                     _MM_HINT_T0);
    }
    const __m512bh w0 = load_bh(w[0] + k), w1 = load_bh(w[1] + k);
    const __m512bh w2 = load_bh(w[2] + k), w3 = load_bh(w[3] + k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = load_bh(x_RK + r * K + k);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xv, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xv, w3);
    }
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1);
    const __m512bh w0 = load_bh_masked(w[0] + k, mask), w1 = load_bh_masked(w[1] + k, mask);
    const __m512bh w2 = load_bh_masked(w[2] + k, mask), w3 = load_bh_masked(w[3] + k, mask);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = load_bh_masked(x_RK + r * K + k, mask);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xv, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xv, w3);
    }
  }
  // 16 horizontal sums at once (rows >= R are zeros): per row, pairs of
  // accumulators are interleaved and added twice, leaving in each 128-bit block the four
  // partial sums [j = 0..3] of that block; then blocks are added across rows so that lane
  // r * 4 + j of `total` holds sum(acc[r][j]).
  __m512 u[kTileM];
#pragma GCC unroll 4
  for (int r = 0; r < kTileM; ++r) {
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(acc[r][0], acc[r][1]),
                                     _mm512_unpackhi_ps(acc[r][0], acc[r][1]));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(acc[r][2], acc[r][3]),
                                     _mm512_unpackhi_ps(acc[r][2], acc[r][3]));
    u[r] = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))));
  }
  constexpr int kEven = _MM_SHUFFLE(2, 0, 2, 0), kOdd = _MM_SHUFFLE(3, 1, 3, 1);
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], kEven),
                                   _mm512_shuffle_f32x4(u[0], u[1], kOdd));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], kEven),
                                   _mm512_shuffle_f32x4(u[2], u[3], kOdd));
  const __m512 total = _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, kEven),
                                     _mm512_shuffle_f32x4(w01, w23, kOdd));
  _mm512_storeu_ps(acc_out, total);
}

void avx512_tiles(const Problem& p, int64_t tile_begin, int64_t tile_end) {
  float acc[kTileM * kTileN];
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t n0 = t * kTileN;
    const int64_t cols = std::min(kTileN, p.N - n0);
    // N tail: the missing rows repeat the last real row; their sums are not stored.
    const uint16_t* w[kTileN];
    for (int64_t j = 0; j < kTileN; ++j) w[j] = p.w_NK + (n0 + std::min(j, cols - 1)) * p.K;
    __m128 bias4 = _mm_setzero_ps();
    if (p.bias_N != nullptr && cols == kTileN) {  // 4 bf16 -> fp32: widen, shift into the high half
      const __m128i b16 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.bias_N + n0));
      bias4 = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(b16), 16));
    }
    for (int64_t m0 = 0; m0 < p.M; m0 += kTileM) {
      const int64_t rows = std::min(kTileM, p.M - m0);
      const uint16_t* x = p.x_MK + m0 * p.K;
      if (p.M >= 2) {
        switch (rows) {
          case 1: tile_dot<1, true>(x, w, p.K, acc); break;
          case 2: tile_dot<2, true>(x, w, p.K, acc); break;
          case 3: tile_dot<3, true>(x, w, p.K, acc); break;
          default: tile_dot<4, true>(x, w, p.K, acc); break;
        }
      } else {
        tile_dot<1, false>(x, w, p.K, acc);
      }
      if (cols == kTileN) {  // vector epilogue: + bias, round to bf16, one 8-byte store
        for (int64_t r = 0; r < rows; ++r) {
          __m128 v = _mm_add_ps(_mm_loadu_ps(acc + r * kTileN), bias4);
          const __m128i packed = (__m128i)_mm_cvtne2ps_pbh(v, v);  // both halves = v
          _mm_storel_epi64(reinterpret_cast<__m128i*>(p.y_MN + (m0 + r) * p.N + n0), packed);
        }
      } else {
        store_tile(p, acc, m0, rows, n0, cols);
      }
    }
  }
}

void run_avx512(const Problem& p) {
  const int64_t tiles = (p.N + kTileN - 1) / kTileN;
  const int64_t grain =
      std::max<int64_t>(1, kMinWorkPerThread / (kTileN * std::max<int64_t>(p.K, 1)));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) { avx512_tiles(p, t0, t1); });
}

#endif  // __AVX512BF16__

#include "skinny_gemm_amx.h"

// ---------------------------------------------------------------- op entry points
at::Tensor prepare(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                   Problem& p, at::Tensor& x_c, at::Tensor& b_c) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2,
              "skinny_gemm.linear: x [M, K] and w [N, K] must be 2-D, got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "skinny_gemm.linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "skinny_gemm.linear: x and w must be bfloat16");
  TORCH_CHECK(x.size(1) == w.size(1), "skinny_gemm.linear: inner dims differ: x ", x.sizes(),
              ", w ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "skinny_gemm.linear: w must be contiguous (no copy is made)");
  x_c = x.contiguous();
  p.M = x.size(0);
  p.K = x.size(1);
  p.N = w.size(0);
  p.bias_N = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->device().is_cpu() &&
                    bias->dim() == 1 && bias->size(0) == p.N,
                "skinny_gemm.linear: bias must be a bfloat16 CPU vector of ", p.N, " elements");
    b_c = bias->contiguous();
    p.bias_N = reinterpret_cast<const uint16_t*>(b_c.data_ptr<at::BFloat16>());
  }
  at::Tensor y = at::empty({p.M, p.N}, x.options());
  p.x_MK = reinterpret_cast<const uint16_t*>(x_c.data_ptr<at::BFloat16>());
  p.w_NK = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  p.y_MN = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  return y;
}

bool trivial(const Problem& p, at::Tensor& y, const at::Tensor& b_c) {
  if (p.M == 0 || p.N == 0) return true;
  if (p.K == 0) {  // empty sum: bias or zeros
    if (p.bias_N != nullptr) y.copy_(b_c.unsqueeze(0).expand({p.M, p.N}));
    else y.zero_();
    return true;
  }
  return false;
}

enum class Path { kBest, kVector, kPortable };

// Fills y of a prepared, non-trivial problem. kBest: AMX tiles where usable, else the AVX-512
// BF16 vector path, else the portable loop; kVector skips the tiles (tests and benchmarks
// compare the paths).
void compute(const Problem& p, Path path) {
  if (path == Path::kPortable) {
    run_portable(p);
    return;
  }
#if defined(SKINNY_HAVE_AMX)
  if (path == Path::kBest && amx::usable(p)) {
    amx::run_many({&p}, avx512_tiles);
    return;
  }
#endif
#if defined(__AVX512BF16__)
  run_avx512(p);
#else
  run_portable(p);
#endif
}

at::Tensor run(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
               Path path) {
  Problem p;
  at::Tensor x_c, b_c;
  at::Tensor y = prepare(x, w, bias, p, x_c, b_c);
  if (!trivial(p, y, b_c)) compute(p, path);
  return y;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  return run(x, w, bias, Path::kBest);
}

// y_i = x @ w_i^T for several weights sharing x (e.g. q, k, v): outputs equal to separate
// `linear` calls, computed in one parallel region (one repack of x) where AMX takes them all.
std::vector<at::Tensor> linear_multi(const at::Tensor& x, at::TensorList ws) {
  TORCH_CHECK(!ws.empty(), "skinny_gemm.linear_multi: no weights given");
  std::vector<Problem> ps(ws.size());
  std::vector<at::Tensor> ys, x_cs(ws.size()), b_cs(ws.size());
  std::vector<const Problem*> todo;  // the non-trivial problems
  for (size_t i = 0; i < ws.size(); ++i) {
    ys.push_back(prepare(x, ws[i], c10::nullopt, ps[i], x_cs[i], b_cs[i]));
    if (!trivial(ps[i], ys[i], b_cs[i])) todo.push_back(&ps[i]);
  }
#if defined(SKINNY_HAVE_AMX)
  if (!todo.empty() && std::all_of(todo.begin(), todo.end(),
                                   [](const Problem* p) { return amx::usable(*p); })) {
    amx::run_many(todo, avx512_tiles);
    return ys;
  }
#endif
  for (const Problem* p : todo) compute(*p, Path::kBest);
  return ys;
}

at::Tensor linear_avx512(const at::Tensor& x, const at::Tensor& w,
                         const c10::optional<at::Tensor>& bias) {
  return run(x, w, bias, Path::kVector);
}

at::Tensor linear_portable(const at::Tensor& x, const at::Tensor& w,
                           const c10::optional<at::Tensor>& bias) {
  return run(x, w, bias, Path::kPortable);
}

bool has_amx() {
#if defined(SKINNY_HAVE_AMX)
  return amx::os_permits();
#else
  return false;
#endif
}

bool has_avx512_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(minicpm4_skinny_gemm, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias) -> Tensor", &linear);
  m.def("linear_multi(Tensor x, Tensor[] ws) -> Tensor[]", &linear_multi);
  m.def("linear_portable(Tensor x, Tensor w, Tensor? bias) -> Tensor", &linear_portable);
  m.def("linear_avx512(Tensor x, Tensor w, Tensor? bias) -> Tensor", &linear_avx512);
  m.def("has_avx512_bf16() -> bool", &has_avx512_bf16);
  m.def("has_amx() -> bool", &has_amx);
}
