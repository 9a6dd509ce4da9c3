// InfLLM v2 block selection on CPU, fused (spec §2.2 steps 3-5, §2.3; Python side:
// minicpm4/kernels/infllm_v2/select_cpp.py, oracle: selection.select_blocks).
//
// Work item = (kv head, tile of R query tokens). The tile's queries, all G heads of the group
// packed as rows, are multiplied with the visible compressed keys Kc1 (one sgemm; and with the
// coarse Kc2 for the approximate LSE). Per row the LSE is taken over the visible keys, then
// S[r, j] = sum_g exp(logit - lse) for visible j (0 otherwise). Block scores are the max of
// S over [ps*b - 1, ps*b + ps - 1] (max_pool1d kernel ps+1, stride ps, padding 1), sink and
// local blocks +inf, future blocks -inf (last). The top `width` blocks, ties to the lower id,
// are written ascending with future ids replaced by -1 at the row's end, as in Python.
// All in cache-sized tiles, so no [N, T, C] score tensor is ever materialised.
//
// Shape legend: N query heads, K kv heads, G = N / K, T queries, H head dim, C1/C2 compressed
// keys, nb blocks, R rows per tile, M = R * G packed rows.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mkl_gemm.h"

namespace {

using minicpm4_mkl::gemm_nt;

constexpr float kInf = std::numeric_limits<float>::infinity();

// Number of compressed keys visible at position pos: j visible iff stride*j + kernel-1 <= pos.
inline int64_t num_visible(int64_t pos, int64_t kernel, int64_t stride, int64_t count) {
  const int64_t num = pos + 1 - kernel;
  const int64_t fl = num >= 0 ? num / stride : -((-num + stride - 1) / stride);
  return std::clamp<int64_t>(fl + 1, 0, count);
}

// Log-sum-exp of x[0:n); -inf for n == 0 (the caller maps it to 0).
inline float lse_of(const float* x, int64_t n) {
  if (n <= 0) return -kInf;
  float mx = -kInf;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, x[j]);
  if (mx == -kInf) return -kInf;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += std::exp(x[j] - mx);
  return mx + std::log(sum);
}

struct Params {
  int64_t kernel, stride, ckernel, cstride, bs, ps, init_blocks, local_blocks, width;
  bool approx;
};

struct Workspace {
  std::vector<float> q, l1, l2, lse, s, blk;
  std::vector<int32_t> order;
};

// Compressed keys per chunk of the fused approximate-LSE pass: the tile's [M, kCols] scores
// stay in L2 while they are exponentiated (a [M, C1] score tile of 4 MiB at 64K did not).
constexpr int64_t kCols = 256;

// Columns of S that can change a non-forced block's score for a row in block q_blk: blocks
// up to q_blk - local_blocks - 1 read keys below ps * (q_blk - local_blocks).
inline int64_t needed_cols(int64_t q_blk, const Params& p) {
  return std::max<int64_t>(p.ps * (q_blk - p.local_blocks), 0);
}

// S[r, 0:C1) for every row of the tile: sum over the G heads of exp(logit - lse) over the
// visible keys (0 elsewhere). Exact LSE: one [M, used1] product, the LSE over its visible
// part. Approximate LSE: the LSE from Kc2 first, then Kc1 in chunks of kCols keys, each
// exponentiated while in cache, and only up to the keys a non-forced block reads (the
// scores of forced blocks are +inf whatever S is).
void tile_scores(const float* kc1_CH, const float* kc2_CH, int64_t G, int64_t H, int64_t C1,
                 int64_t C2, int64_t q_offset, const Params& p, int64_t t0, int64_t rows,
                 Workspace& ws) {
  const int64_t M = rows * G, first = q_offset + t0, last = first + rows - 1;
  const int64_t used1 = num_visible(last, p.kernel, p.stride, C1);
  const int64_t used2 = p.approx ? num_visible(last, p.ckernel, p.cstride, C2) : 0;
  ws.s.assign(std::max<int64_t>(rows * C1, 1), 0.f);
  if (used2 > 0) {
    ws.l2.resize(M * used2);
    gemm_nt(int(M), int(used2), int(H), ws.q.data(), int(H), kc2_CH, int(H), ws.l2.data(),
            int(used2));
  }
  // A row that sees no coarse key takes the exact LSE (as the Python selection does).
  const bool chunked = p.approx && num_visible(first, p.ckernel, p.cstride, C2) > 0;
  if (!chunked) {
    ws.l1.resize(std::max<int64_t>(M * used1, 1));
    if (used1 > 0)
      gemm_nt(int(M), int(used1), int(H), ws.q.data(), int(H), kc1_CH, int(H), ws.l1.data(),
              int(used1));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n1 = num_visible(first + r, p.kernel, p.stride, C1);
      const int64_t n2 = p.approx ? num_visible(first + r, p.ckernel, p.cstride, C2) : 0;
      float* s = ws.s.data() + r * C1;
      for (int64_t g = 0; g < G; ++g) {
        const float* l1 = ws.l1.data() + (r * G + g) * used1;
        float lse = n2 > 0 ? lse_of(ws.l2.data() + (r * G + g) * used2, n2) : lse_of(l1, n1);
        if (lse == -kInf) lse = 0.f;
#pragma omp simd
        for (int64_t j = 0; j < n1; ++j) s[j] += std::exp(l1[j] - lse);
      }
    }
    return;
  }
  ws.lse.resize(M);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n2 = num_visible(first + r, p.ckernel, p.cstride, C2);
    for (int64_t g = 0; g < G; ++g) {
      const float lse = lse_of(ws.l2.data() + (r * G + g) * used2, n2);
      ws.lse[r * G + g] = lse == -kInf ? 0.f : lse;
    }
  }
  const int64_t cols = std::min(used1, needed_cols(last / p.bs, p));
  ws.l1.resize(M * kCols);
  for (int64_t c0 = 0; c0 < cols; c0 += kCols) {
    const int64_t nc = std::min(kCols, cols - c0);
    gemm_nt(int(M), int(nc), int(H), ws.q.data(), int(H), kc1_CH + c0 * H, int(H),
            ws.l1.data(), int(nc));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = first + r;
      const int64_t n1 = std::min(num_visible(pos, p.kernel, p.stride, C1),
                                  needed_cols(pos / p.bs, p));
      const int64_t hi = std::min(n1, c0 + nc) - c0;
      if (hi <= 0) continue;
      float* s = ws.s.data() + r * C1 + c0;
      for (int64_t g = 0; g < G; ++g) {
        const float* l1 = ws.l1.data() + (r * G + g) * nc;
        const float lse = ws.lse[r * G + g];
#pragma omp simd
        for (int64_t j = 0; j < hi; ++j) s[j] += std::exp(l1[j] - lse);
      }
    }
  }
}

void tile_select(const float* q_NTH, const float* kc1_KCH, const float* kc2_KCH,
                 int32_t* out_KTw, int64_t N, int64_t K, int64_t T, int64_t H, int64_t C1,
                 int64_t C2, int64_t nb, int64_t q_offset, const Params& p, float scale,
                 int64_t kh, int64_t t0, int64_t R, Workspace& ws) {
  const int64_t G = N / K, t1 = std::min(t0 + R, T), rows = t1 - t0, M = rows * G;
  ws.q.resize(M * H);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float* src = q_NTH + ((kh * G + g) * T + t0 + r) * H;
      float* dst = ws.q.data() + (r * G + g) * H;
      for (int64_t h = 0; h < H; ++h) dst[h] = src[h] * scale;
    }
  tile_scores(kc1_KCH + kh * C1 * H, kc2_KCH + kh * C2 * H, G, H, C1, C2, q_offset, p, t0,
              rows, ws);
  ws.blk.resize(nb);
  ws.order.resize(nb);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = q_offset + t0 + r;
    const float* s = ws.s.data() + r * C1;
    // Block scores: max-pool, then forced and future blocks.
    const int64_t q_blk = pos / p.bs;
    float* blk = ws.blk.data();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t lo = std::max<int64_t>(p.ps * b - 1, 0), hi = std::min(p.ps * b + p.ps, C1);
      float mx = -kInf;
      for (int64_t j = lo; j < hi; ++j) mx = std::max(mx, s[j]);
      if ((b < p.init_blocks) || (b >= q_blk - p.local_blocks && b <= q_blk)) mx = kInf;
      if (b > q_blk) mx = -kInf;
      blk[b] = mx;
    }
    // Top `width`, ties to the lower id; then ascending, future ids -> -1 (at the end).
    int32_t* order = ws.order.data();
    for (int64_t b = 0; b < nb; ++b) order[b] = int32_t(b);
    auto better = [blk](int32_t a, int32_t b) {
      return blk[a] > blk[b] || (blk[a] == blk[b] && a < b);
    };
    if (p.width < nb) std::nth_element(order, order + p.width, order + nb, better);
    std::sort(order, order + p.width);
    int32_t* dst = out_KTw + (kh * T + t0 + r) * p.width;
    for (int64_t j = 0; j < p.width; ++j) dst[j] = order[j] > q_blk ? -1 : order[j];
  }
}

at::Tensor select_forward(const at::Tensor& q, const at::Tensor& kc1, const at::Tensor& kc2,
                          int64_t q_offset, int64_t num_keys, int64_t kernel, int64_t stride,
                          int64_t ckernel, int64_t cstride, int64_t block_size,
                          int64_t init_blocks, int64_t local_blocks, int64_t num_selected,
                          bool approx, int64_t rows) {
  TORCH_CHECK(q.dim() == 3 && kc1.dim() == 3 && kc2.dim() == 3,
              "select_forward: expected q [N,T,H], kc1/kc2 [K,C,H]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kc1.scalar_type() == at::kFloat &&
                  kc2.scalar_type() == at::kFloat,
              "select_forward: float32 tensors expected");
  const int64_t N = q.size(0), T = q.size(1), H = q.size(2), K = kc1.size(0);
  TORCH_CHECK(K > 0 && N % K == 0 && kc1.size(2) == H && kc2.size(0) == K && kc2.size(2) == H,
              "select_forward: inconsistent shapes");
  TORCH_CHECK(block_size % stride == 0 && rows >= 1 && num_keys == q_offset + T,
              "select_forward: bad block_size / stride / rows / num_keys");
  const int64_t nb = (num_keys + block_size - 1) / block_size;
  Params p{kernel, stride, ckernel, cstride, block_size, block_size / stride, init_blocks,
           local_blocks, std::min(num_selected, nb), approx};
  auto out = at::empty({K, T, p.width}, q.options().dtype(at::kInt));
  if (T == 0 || p.width == 0) return out;
  auto qc = q.contiguous(), k1 = kc1.contiguous(), k2 = kc2.contiguous();
  const float* qp = qc.data_ptr<float>();
  const float* k1p = k1.data_ptr<float>();
  const float* k2p = k2.data_ptr<float>();
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t tiles = (T + rows - 1) / rows, items = K * tiles;
  const float scale = 1.f / std::sqrt(float(H));
  // Late tiles (most keys) first, for the dynamic schedule's balance.
  minicpm4_mkl::parallel_items<Workspace>(items, [&](int64_t w, Workspace& ws) {
    tile_select(qp, k1p, k2p, op, N, K, T, H, kc1.size(1), kc2.size(1), nb, q_offset, p, scale,
                w % K, (tiles - 1 - w / K) * rows, rows, ws);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(minicpm4_sparse_select, m) {
  m.def("forward(Tensor q, Tensor kc1, Tensor kc2, int q_offset, int num_keys, int kernel, "
        "int stride, int ckernel, int cstride, int block_size, int init_blocks, "
        "int local_blocks, int num_selected, bool approx, int rows) -> Tensor",
        &select_forward);
}
