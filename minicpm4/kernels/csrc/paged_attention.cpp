// Decode attention straight from the paged KV cache, bf16 CPU inference (issue 5).
//
// A decode step's rows each hold their keys in pages of the engine's block pool
// (engine/kv_cache.py). The PyTorch path gathers every row's keys and values into a
// left-padded [B, K, S, H] copy per layer, widens q, k and v to fp32 (torch's bf16 CPU SDPA is
// slow) and runs SDPA with a padding mask. This op reads the pages in place through the block
// table: per (row, kv head), the G query heads of the group are scored against the row's
// keys in fp32 (scale 1/sqrt(H)), softmax, and the values summed in fp32; one rounding to
// bf16. Reference: kernels/paged_attention.py `decode_reference` (gather + fp32 softmax).
// q [B, N, H] bf16; pages [num_blocks, block_size, K, H] bf16; table [B, W] int64 (block
// ids); lens [B] int64 (keys per row, the new token's included, >= 1).
// With AVX-512 BF16 and H % 32 == 0 (every MiniCPM4 model) the vector path runs
// (row_head_vec: VDPBF16PS scores over 16 keys at a time, a vector exp, the value sums in
// register accumulators); 1.2-2.7x the previous AVX-512 loop that scored one key at a time
// with a horizontal sum, a scalar exp and accumulators in memory (1-32 rows of 200-4000
// keys, GQA 2-16, H = 64 and 128, 2 threads; benchmarks/results/
// 2026-12_cpu-2core-amx_paged_attention.md). Other head dims, or CPUs without AVX-512 BF16,
// take the scalar loop.
// Shape legend: B rows, N query heads, K kv heads, G = N / K, H head dim, L keys of a row.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>

#include "avx512_math.h"
#endif

namespace {

inline float bf(c10::BFloat16 v) { return static_cast<float>(v); }

// s_L <- softmax(s_L) in place (fp32).
void softmax(float* s_L, int64_t L) {
  const float mx = *std::max_element(s_L, s_L + L);
  float sum = 0.f;
  for (int64_t l = 0; l < L; ++l) {
    s_L[l] = std::exp(s_L[l] - mx);
    sum += s_L[l];
  }
  const float inv = 1.f / sum;
  for (int64_t l = 0; l < L; ++l) s_L[l] *= inv;
}

void row_head_scalar(const c10::BFloat16* q_GH, const c10::BFloat16* kp, const c10::BFloat16* vp,
              const int64_t* table_W, int64_t L, int64_t bs, int64_t K, int64_t kv, int64_t G,
              int64_t H, float scale, c10::BFloat16* out_GH, std::vector<float>& scores,
              std::vector<float>& acc) {
  scores.assign(static_cast<size_t>(G * L), 0.f);
  acc.assign(static_cast<size_t>(G * H), 0.f);
  std::vector<float> qf(static_cast<size_t>(G * H));
  for (int64_t i = 0; i < G * H; ++i) qf[i] = bf(q_GH[i]) * scale;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t slot = table_W[l / bs] * bs + l % bs;
    const c10::BFloat16* k_H = kp + (slot * K + kv) * H;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t h = 0; h < H; ++h) s += qf[g * H + h] * bf(k_H[h]);
      scores[g * L + l] = s;
    }
  }
  for (int64_t g = 0; g < G; ++g) softmax(scores.data() + g * L, L);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t slot = table_W[l / bs] * bs + l % bs;
    const c10::BFloat16* v_H = vp + (slot * K + kv) * H;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * L + l];
      float* a_H = acc.data() + g * H;
      for (int64_t h = 0; h < H; ++h) a_H[h] += p * bf(v_H[h]);
    }
  }
  for (int64_t i = 0; i < G * H; ++i) out_GH[i] = c10::BFloat16(acc[i]);
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define PAGED_HAVE_VEC 1
// The vector path (row_head_vec), for H % 32 == 0 and H <= kMaxH, in three passes over the
// row's keys, each read once per (row, kv head) for all G heads of the group:
// - scores, 16 keys at a time: the keys' bf16 pairs are transposed in registers (lane j =
//   key j) and each head's scores come from VDPBF16PS against its q pairs broadcast
//   (bf16 x bf16 products are exact in fp32; sums in fp32), then x 1/sqrt(H);
// - softmax: max, exp (exp512, avx512_math.h) and sum on 16 lanes (the padding lanes of
//   the last block score -inf, so their exp is ~1e-38: nothing next to the max's 1);
// - values: the probabilities times each value row summed in registers (heads in blocks
//   of 16 / C accumulators of C vectors, C = H / 16), x 1 / sum, rounded to bf16 once.
// Same fp32 precision as the scalar loop, another order of the sums.
constexpr int64_t kMaxH = 256;

// Per-thread buffers of row_head_vec.
struct Scratch {
  std::vector<int64_t> key_off;  // [Lp] element offset of key l's head vector in the pages
  std::vector<float> scores;     // [G, Lp] scores, then exp(score - max); -inf past L
  std::vector<__m512> dots;      // [G] running dot products of a 16-key block
  std::vector<float> inv;        // [G] 1 / the softmax sums
};

// scores_GL[g, l0 + j] for the keys of block l0 (n <= 16 of them): H / 32 chunks of 16
// pairs per key, each transposed so that lane j holds key j's pair.
// `next`: the next block's key offsets (prefetched), or null.
inline void score_block(const uint32_t* q32_GP, const c10::BFloat16* kp, const int64_t* off,
                        const int64_t* next, int64_t n, int64_t G, int64_t P, float scale,
                        float* scores_GL, int64_t Lp, int64_t l0, __m512* dots_G) {
  for (int64_t g = 0; g < G; ++g) dots_G[g] = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < P; p0 += 16) {
    if (p0 == 0 && next != nullptr) {  // the next block's keys, while this one is computed
      for (int j = 0; j < 16; ++j)
        for (int64_t c = 0; c < P; c += 16)
          _mm_prefetch(reinterpret_cast<const char*>(kp + next[j]) + 4 * c, _MM_HINT_T0);
    }
    __m512 kt[16];
    if (n == 16) {
      for (int j = 0; j < 16; ++j)
        kt[j] = _mm512_loadu_ps(reinterpret_cast<const float*>(kp + off[j]) + p0);
    } else {
      for (int64_t j = 0; j < 16; ++j)
        kt[j] = j < n ? _mm512_loadu_ps(reinterpret_cast<const float*>(kp + off[j]) + p0)
                      : _mm512_setzero_ps();
    }
    transpose16(kt);  // kt[p] lane j = pair p0 + p of key j
    for (int64_t g = 0; g < G; ++g) {
      // four independent chains (the pairs p mod 4), not one 16 VDPBF16PS long
      __m512 d[4] = {dots_G[g], _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      const uint32_t* q_p = q32_GP + g * P + p0;
      for (int p = 0; p < 16; ++p)
        d[p % 4] = _mm512_dpbf16_ps(d[p % 4], (__m512bh)kt[p],
                                    (__m512bh)_mm512_set1_epi32(static_cast<int>(q_p[p])));
      dots_G[g] = _mm512_add_ps(_mm512_add_ps(d[0], d[1]), _mm512_add_ps(d[2], d[3]));
    }
  }
  const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  for (int64_t g = 0; g < G; ++g)
    _mm512_storeu_ps(scores_GL + g * Lp + l0,
                     _mm512_mask_mul_ps(ninf, live, dots_G[g], _mm512_set1_ps(scale)));
}

// out_GH[g0 .. g0 + GB) = sum over l of p[g, l] v_l, x inv[g]; C = H / 16 vectors per head,
// the GB heads' accumulators in registers. The values 8 keys ahead are prefetched (the keys
// of a row are scattered over pages).
template <int C, int GB>
void value_block(const c10::BFloat16* vp, const int64_t* off, int64_t L, const float* p_GL,
                 int64_t Lp, int64_t g0, const float* inv_G, c10::BFloat16* out_GH) {
  __m512 acc[GB][C];
  for (int gi = 0; gi < GB; ++gi)
    for (int c = 0; c < C; ++c) acc[gi][c] = _mm512_setzero_ps();
  const float* p_L = p_GL + g0 * Lp;
  for (int64_t l = 0; l < L; ++l) {
    if (l + 8 < L) {
      const char* ahead = reinterpret_cast<const char*>(vp + off[l + 8]);
      for (int c = 0; c < C; c += 2) _mm_prefetch(ahead + 32 * c, _MM_HINT_T0);
    }
    const c10::BFloat16* v_H = vp + off[l];
    __m512 v[C];
    for (int c = 0; c < C; ++c) v[c] = widen_bf16x16(v_H + 16 * c);
    for (int gi = 0; gi < GB; ++gi) {
      const __m512 p = _mm512_set1_ps(p_L[gi * Lp + l]);
      for (int c = 0; c < C; ++c) acc[gi][c] = _mm512_fmadd_ps(p, v[c], acc[gi][c]);
    }
  }
  for (int gi = 0; gi < GB; ++gi) {
    const __m512 s = _mm512_set1_ps(inv_G[g0 + gi]);
    for (int c = 0; c < C; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_GH + (g0 + gi) * C * 16 + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[gi][c], s)));
  }
}

// value_block over the G heads in blocks of up to kMaxAcc / C (a last, smaller block
// instantiated for its exact size, so that every accumulator stays in a register).
constexpr int kMaxAcc = 16;

template <int C, int GB = (C >= kMaxAcc ? 1 : kMaxAcc / C)>
void values(const c10::BFloat16* vp, const int64_t* off, int64_t L, const float* p_GL,
            int64_t Lp, int64_t G, int64_t g0, const float* inv_G, c10::BFloat16* out_GH) {
  for (; g0 + GB <= G; g0 += GB) value_block<C, GB>(vp, off, L, p_GL, Lp, g0, inv_G, out_GH);
  if constexpr (GB > 1) {
    if (g0 < G) values<C, GB - 1>(vp, off, L, p_GL, Lp, G, g0, inv_G, out_GH);
  }
}

void row_head_vec(const c10::BFloat16* q_GH, const c10::BFloat16* kp, const c10::BFloat16* vp,
                  const int64_t* table_W, int64_t L, int64_t bs, int64_t K, int64_t kv,
                  int64_t G, int64_t H, float scale, c10::BFloat16* out_GH, Scratch& s) {
  const int64_t Lp = (L + 15) / 16 * 16, P = H / 2;
  s.key_off.resize(static_cast<size_t>(Lp));
  for (int64_t l = 0; l < L; ++l)
    s.key_off[l] = ((table_W[l / bs] * bs + l % bs) * K + kv) * H;
  s.scores.resize(static_cast<size_t>(G * Lp));
  s.dots.resize(static_cast<size_t>(G));
  const auto* q32_GP = reinterpret_cast<const uint32_t*>(q_GH);
  for (int64_t l0 = 0; l0 < L; l0 += 16)
    score_block(q32_GP, kp, s.key_off.data() + l0,
                l0 + 32 <= L ? s.key_off.data() + l0 + 16 : nullptr,
                std::min<int64_t>(16, L - l0), G, P, scale,
                s.scores.data(), Lp, l0, s.dots.data());
  std::vector<float>& inv = s.inv;
  inv.resize(static_cast<size_t>(G));
  for (int64_t g = 0; g < G; ++g) {
    float* s_L = s.scores.data() + g * Lp;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t l = 0; l < Lp; l += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s_L + l));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t l = 0; l < Lp; l += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s_L + l), m));
      _mm512_storeu_ps(s_L + l, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
  const int64_t* off = s.key_off.data();
  switch (H / 16) {
    case 2: values<2>(vp, off, L, s.scores.data(), Lp, G, 0, inv.data(), out_GH); break;
    case 4: values<4>(vp, off, L, s.scores.data(), Lp, G, 0, inv.data(), out_GH); break;
    case 6: values<6>(vp, off, L, s.scores.data(), Lp, G, 0, inv.data(), out_GH); break;
    case 8: values<8>(vp, off, L, s.scores.data(), Lp, G, 0, inv.data(), out_GH); break;
    case 10: values<10>(vp, off, L, s.scores.data(), Lp, G, 0, inv.data(), out_GH); break;
    case 12: values<12>(vp, off, L, s.scores.data(), Lp, G, 0, inv.data(), out_GH); break;
    case 14: values<14>(vp, off, L, s.scores.data(), Lp, G, 0, inv.data(), out_GH); break;
    default: values<16>(vp, off, L, s.scores.data(), Lp, G, 0, inv.data(), out_GH); break;
  }
}
#endif

at::Tensor decode(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                  const at::Tensor& table, const at::Tensor& lens) {
  TORCH_CHECK(q.device().is_cpu() && k_pages.device().is_cpu() && v_pages.device().is_cpu(),
              "paged decode: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_pages.scalar_type() == at::kBFloat16 &&
                  v_pages.scalar_type() == at::kBFloat16,
              "paged decode: q and the pages must be bfloat16");
  TORCH_CHECK(table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "paged decode: table and lens must be int64");
  TORCH_CHECK(q.dim() == 3 && k_pages.dim() == 4 && k_pages.sizes() == v_pages.sizes() &&
                  table.dim() == 2 && lens.dim() == 1 && table.size(0) == q.size(0) &&
                  lens.size(0) == q.size(0) && k_pages.size(3) == q.size(2) &&
                  q.size(1) % k_pages.size(2) == 0,
              "paged decode: q [B, N, H], pages [blocks, block_size, K, H] (N % K == 0), "
              "table [B, W], lens [B] expected, got ", q.sizes(), ", ", k_pages.sizes(), ", ",
              table.sizes(), ", ", lens.sizes());
  TORCH_CHECK(k_pages.is_contiguous() && v_pages.is_contiguous(),
              "paged decode: the pages must be contiguous");
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2);
  const int64_t bs = k_pages.size(1), K = k_pages.size(2), G = N / K, W = table.size(1);
  const int64_t num_blocks = k_pages.size(0);
  const at::Tensor q_c = q.contiguous(), table_c = table.contiguous(), lens_c = lens.contiguous();
  const int64_t* tp = table_c.data_ptr<int64_t>();
  const int64_t* lp = lens_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= W * bs, "paged decode: row ", b, " has ", lp[b],
                " keys; its block table holds at most ", W * bs);
    for (int64_t w = 0; w < (lp[b] + bs - 1) / bs; ++w)
      TORCH_CHECK(tp[b * W + w] >= 0 && tp[b * W + w] < num_blocks, "paged decode: row ", b,
                  " names block ", tp[b * W + w], " of a pool of ", num_blocks);
  }
  at::Tensor out = at::empty_like(q_c);
  const auto* qp = q_c.data_ptr<c10::BFloat16>();
  const auto* kp = k_pages.data_ptr<c10::BFloat16>();
  const auto* vp = v_pages.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  const float scale = 1.f / std::sqrt(static_cast<float>(H));
#if defined(PAGED_HAVE_VEC)
  const bool vec = H % 32 == 0 && H <= kMaxH;
#endif
  at::parallel_for(0, B * K, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores, acc;
#if defined(PAGED_HAVE_VEC)
    Scratch scratch;
#endif
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / K, kv = i % K;
      const c10::BFloat16* q_GH = qp + (b * N + kv * G) * H;
      c10::BFloat16* out_GH = op + (b * N + kv * G) * H;
#if defined(PAGED_HAVE_VEC)
      if (vec) {
        row_head_vec(q_GH, kp, vp, tp + b * W, lp[b], bs, K, kv, G, H, scale, out_GH, scratch);
        continue;
      }
#endif
      row_head_scalar(q_GH, kp, vp, tp + b * W, lp[b], bs, K, kv, G, H, scale, out_GH, scores,
                      acc);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(minicpm4_paged_attention, m) {
  m.def("decode(Tensor q, Tensor k_pages, Tensor v_pages, Tensor table, Tensor lens) -> Tensor",
        &decode);
}
