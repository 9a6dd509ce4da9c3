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
// With AVX-512 (H % 16 == 0) the dot products and the value sums run on 16-lane vectors,
// each key and value widened once for the G heads of its group (row_head_avx512):
// 1.25-1.6x the scalar loop at 1-32 rows of 60-200 keys (GQA 2-8, H = 64, 2 threads).
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

#if defined(__AVX512F__)
// bf16 [16] -> fp32 [16]: widen and shift into the high half.
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// row_head_scalar with 16-lane vectors, for H % 16 == 0 (H <= kMaxH): each key (and value)
// is widened once and used by all G heads of the group. Dot products are summed in 16
// lanes, then across them: another order than the scalar loop, same fp32 precision.
constexpr int64_t kMaxH = 256;

void row_head_avx512(const c10::BFloat16* q_GH, const c10::BFloat16* kp,
                     const c10::BFloat16* vp, const int64_t* table_W, int64_t L, int64_t bs,
                     int64_t K, int64_t kv, int64_t G, int64_t H, float scale,
                     c10::BFloat16* out_GH, std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t C = H / 16;  // 16-lane chunks per head vector
  scores.assign(static_cast<size_t>(G * L), 0.f);
  acc.assign(static_cast<size_t>(G * H), 0.f);
  std::vector<float> qf(static_cast<size_t>(G * H));
  for (int64_t i = 0; i < G * H; ++i) qf[i] = bf(q_GH[i]) * scale;
  __m512 k_C[kMaxH / 16];
  for (int64_t l = 0; l < L; ++l) {
    const int64_t slot = table_W[l / bs] * bs + l % bs;
    const c10::BFloat16* k_H = kp + (slot * K + kv) * H;
    for (int64_t c = 0; c < C; ++c) k_C[c] = load16(k_H + 16 * c);
    for (int64_t g = 0; g < G; ++g) {
      const float* q_H = qf.data() + g * H;
      __m512 s = _mm512_mul_ps(_mm512_loadu_ps(q_H), k_C[0]);
      for (int64_t c = 1; c < C; ++c) s = _mm512_fmadd_ps(_mm512_loadu_ps(q_H + 16 * c), k_C[c], s);
      scores[g * L + l] = _mm512_reduce_add_ps(s);
    }
  }
  for (int64_t g = 0; g < G; ++g) softmax(scores.data() + g * L, L);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t slot = table_W[l / bs] * bs + l % bs;
    const c10::BFloat16* v_H = vp + (slot * K + kv) * H;
    for (int64_t c = 0; c < C; ++c) k_C[c] = load16(v_H + 16 * c);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * L + l]);
      float* a_H = acc.data() + g * H;
      for (int64_t c = 0; c < C; ++c)
        _mm512_storeu_ps(a_H + 16 * c, _mm512_fmadd_ps(p, k_C[c], _mm512_loadu_ps(a_H + 16 * c)));
    }
  }
  for (int64_t i = 0; i < G * H; ++i) out_GH[i] = c10::BFloat16(acc[i]);
}
#endif

// One (row, kv head): the vector loop where it applies, else the scalar one.
void row_head(const c10::BFloat16* q_GH, const c10::BFloat16* kp, const c10::BFloat16* vp,
              const int64_t* table_W, int64_t L, int64_t bs, int64_t K, int64_t kv, int64_t G,
              int64_t H, float scale, c10::BFloat16* out_GH, std::vector<float>& scores,
              std::vector<float>& acc) {
#if defined(__AVX512F__)
  if (H % 16 == 0 && H <= kMaxH) {
    row_head_avx512(q_GH, kp, vp, table_W, L, bs, K, kv, G, H, scale, out_GH, scores, acc);
    return;
  }
#endif
  row_head_scalar(q_GH, kp, vp, table_W, L, bs, K, kv, G, H, scale, out_GH, scores, acc);
}

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
  at::parallel_for(0, B * K, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores, acc;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / K, kv = i % K;
      row_head(qp + (b * N + kv * G) * H, kp, vp, tp + b * W, lp[b], bs, K, kv, G, H, scale,
               op + (b * N + kv * G) * H, scores, acc);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(minicpm4_paged_attention, m) {
  m.def("decode(Tensor q, Tensor k_pages, Tensor v_pages, Tensor table, Tensor lens) -> Tensor",
        &decode);
}
