// InfLLM v2 stage 2 on CPU: fused block-sparse causal attention, forward only
// (spec §2.2 step 6, §2.4; Python side and reference: minicpm4/kernels/infllm_v2/stage2_cpp.py).
//
// Work item = (kv head, row group): R <= 256 consecutive query positions, aligned to
// multiples of R. For each key block, a bit mask records which rows of the group selected it (block ids from idx, -1 and
// future blocks ignored, duplicates harmless). Consecutive blocks with the same row mask form
// one run of up to max_keys keys. Per run, the queries of the masked rows (all G heads of the
// KV group, so M = popcount * G) are packed, scored against the run's keys with one sgemm,
// masked causally where the run reaches a row's own position, folded into a per-row online
// softmax, and P @ V is added with a second sgemm. No key outside a row's selection is
// scored: the FLOPs are exactly the selected ones. fp32 or bf16 in (bf16 keys are converted
// per run), fp32 math and out; MKL sgemm (exported by
// libtorch_cpu) does the matrix products, one thread per work item (OpenMP, dynamic).
//
// Shape legend: N query heads, K kv heads, G = N / K, T queries, S keys, H head dim,
// k slots per row, R rows per group, M packed rows, L keys of a run.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mkl_gemm.h"

namespace {

using minicpm4_mkl::gemm_nn;
using minicpm4_mkl::gemm_nt;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

constexpr int64_t kMaxRows = 256;
using RowMask = std::array<uint64_t, kMaxRows / 64>;  // bit r: row r of the group

inline bool has_row(const RowMask& m, int64_t r) { return (m[r >> 6] >> (r & 63)) & 1; }
inline bool any_row(const RowMask& m) {
  for (uint64_t w : m)
    if (w) return true;
  return false;
}

struct Run {
  int64_t key0, key1;  // keys [key0, key1)
  RowMask rows;        // the rows of the group that attend these keys
};

struct Workspace {
  std::vector<float> q, s, o, acc, m, l, kbuf, vbuf;
  std::vector<RowMask> mask;
  std::vector<int64_t> touched;
  std::vector<Run> runs;
  std::vector<int> packed_state;
};

// fp32 rows of a [rows, H] slice: the pointer itself for fp32, a converted copy for bf16
// (only the keys of one run, so a decode step converts its selected keys, not the cache).
inline const float* as_float(const float* x, int64_t n, std::vector<float>&) { return x; }
inline const float* as_float(const at::BFloat16* x, int64_t n, std::vector<float>& buf) {
  buf.resize(n);
  for (int64_t i = 0; i < n; ++i) buf[i] = float(x[i]);
  return buf.data();
}

template <typename scalar_t>
void group_forward(const scalar_t* q_NTH, const scalar_t* k_KSH, const scalar_t* v_KSH,
                   const int32_t* idx_KTk, float* out_NTH, int64_t N, int64_t K, int64_t T,
                   int64_t S, int64_t H, int64_t slots, int64_t bs, int64_t q_offset, int64_t R,
                   int64_t max_keys, float scale, int64_t kh, int64_t grp, Workspace& ws) {
  const int64_t G = N / K, nb = (S + bs - 1) / bs;
  // Rows of this group that are real queries: positions [p0, p1).
  const int64_t g0 = grp * R;  // first position of the group (absolute, aligned to R)
  const int64_t p0 = std::max(g0, q_offset), p1 = std::min(g0 + R, q_offset + T);
  if (p0 >= p1) return;
  const int64_t r0 = p0 - g0, nrows = p1 - p0;

  // 1. Row masks per block.
  ws.mask.assign(nb, RowMask{});
  ws.touched.clear();
  for (int64_t r = r0; r < r0 + nrows; ++r) {
    const int64_t pos = g0 + r, t = pos - q_offset;
    const int32_t* row = idx_KTk + (kh * T + t) * slots;
    for (int64_t j = 0; j < slots; ++j) {
      const int64_t b = row[j];
      if (b < 0 || b >= nb || b * bs > pos) continue;
      if (!any_row(ws.mask[b])) ws.touched.push_back(b);
      ws.mask[b][r >> 6] |= uint64_t(1) << (r & 63);
    }
  }
  std::sort(ws.touched.begin(), ws.touched.end());

  // 2. Runs of consecutive blocks with the same rows.
  ws.runs.clear();
  for (int64_t b : ws.touched) {
    const int64_t key0 = b * bs, key1 = std::min(key0 + bs, S);
    if (!ws.runs.empty() && ws.runs.back().key1 == key0 && ws.runs.back().rows == ws.mask[b] &&
        key1 - ws.runs.back().key0 <= max_keys) {
      ws.runs.back().key1 = key1;
    } else {
      ws.runs.push_back({key0, key1, ws.mask[b]});
    }
  }

  // 3. Online softmax state per (row, head): index (r - r0) * G + g.
  const int64_t Mmax = nrows * G;
  ws.acc.assign(Mmax * H, 0.f);
  ws.m.assign(Mmax, kNegInf);
  ws.l.assign(Mmax, 0.f);
  ws.q.resize(Mmax * H);
  ws.o.resize(Mmax * H);
  ws.packed_state.resize(Mmax);
  int64_t Lmax = 0;
  for (const Run& run : ws.runs) Lmax = std::max(Lmax, run.key1 - run.key0);
  ws.s.resize(Mmax * std::max<int64_t>(Lmax, 1));

  const scalar_t* k_SH = k_KSH + kh * S * H;
  const scalar_t* v_SH = v_KSH + kh * S * H;
  for (const Run& run : ws.runs) {
    // Pack the queries of the run's rows, every head of the group, scaled.
    int64_t M = 0;
    for (int64_t r = r0; r < r0 + nrows; ++r) {
      if (!has_row(run.rows, r)) continue;
      const int64_t t = g0 + r - q_offset;
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* src = q_NTH + ((kh * G + g) * T + t) * H;
        float* dst = ws.q.data() + M * H;
        for (int64_t h = 0; h < H; ++h) dst[h] = float(src[h]) * scale;
        ws.packed_state[M++] = int((r - r0) * G + g);
      }
    }
    const int64_t L = run.key1 - run.key0;
    float* s_ML = ws.s.data();
    const float* k_LH = as_float(k_SH + run.key0 * H, L * H, ws.kbuf);
    gemm_nt(int(M), int(L), int(H), ws.q.data(), int(H), k_LH, int(H), s_ML,
            int(L));
    // Softmax update per packed row.
    for (int64_t i = 0; i < M; ++i) {
      const int st = ws.packed_state[i];
      const int64_t pos = g0 + r0 + st / G;
      float* srow = s_ML + i * L;
      const int64_t vis = std::min<int64_t>(L, pos - run.key0 + 1);  // keys <= pos
      float mx = kNegInf;
      for (int64_t j = 0; j < vis; ++j) mx = std::max(mx, srow[j]);
      const float m_new = std::max(ws.m[st], mx);
      float sum = 0.f;
      if (m_new == kNegInf) {
        for (int64_t j = 0; j < L; ++j) srow[j] = 0.f;
      } else {
        for (int64_t j = 0; j < vis; ++j) {
          const float p = std::exp(srow[j] - m_new);
          srow[j] = p;
          sum += p;
        }
        for (int64_t j = vis; j < L; ++j) srow[j] = 0.f;
      }
      const float alpha = (ws.m[st] == kNegInf) ? 0.f : std::exp(ws.m[st] - m_new);
      ws.l[st] = ws.l[st] * alpha + sum;
      ws.m[st] = m_new;
      // Rescale the accumulator now; P @ V is added below.
      float* acc = ws.acc.data() + int64_t(st) * H;
      if (alpha != 1.f)
        for (int64_t h = 0; h < H; ++h) acc[h] *= alpha;
    }
    const float* v_LH = as_float(v_SH + run.key0 * H, L * H, ws.vbuf);
    gemm_nn(int(M), int(H), int(L), s_ML, int(L), v_LH, int(H), ws.o.data(),
            int(H));
    for (int64_t i = 0; i < M; ++i) {
      float* acc = ws.acc.data() + int64_t(ws.packed_state[i]) * H;
      const float* o = ws.o.data() + i * H;
      for (int64_t h = 0; h < H; ++h) acc[h] += o[h];
    }
  }

  // 4. Normalise and write out; rows with no visible key give 0.
  for (int64_t r = r0; r < r0 + nrows; ++r) {
    const int64_t t = g0 + r - q_offset;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t st = (r - r0) * G + g;
      const float inv = ws.l[st] > 0.f ? 1.f / ws.l[st] : 0.f;
      const float* acc = ws.acc.data() + st * H;
      float* dst = out_NTH + ((kh * G + g) * T + t) * H;
      for (int64_t h = 0; h < H; ++h) dst[h] = acc[h] * inv;
    }
  }
}

template <typename scalar_t>
void run_groups(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& idx, at::Tensor& out, int64_t block_size, int64_t q_offset,
                int64_t rows, int64_t max_keys, double scale) {
  const int64_t N = q.size(0), T = q.size(1), H = q.size(2);
  const int64_t K = k.size(0), S = k.size(1), slots = idx.size(2);
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), ic = idx.contiguous();
  const int64_t first = q_offset / rows, last = (q_offset + T - 1) / rows;
  const int64_t groups = last - first + 1, items = K * groups;
  const scalar_t* qp = qc.data_ptr<scalar_t>();
  const scalar_t* kp = kc.data_ptr<scalar_t>();
  const scalar_t* vp = vc.data_ptr<scalar_t>();
  const int32_t* ip = ic.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  // Late (expensive) groups first, for the dynamic schedule's balance.
  minicpm4_mkl::parallel_items<Workspace>(items, [&](int64_t w, Workspace& ws) {
    group_forward(qp, kp, vp, ip, op, N, K, T, S, H, slots, block_size, q_offset, rows,
                  max_keys, float(scale), w % K, last - w / K, ws);
  });
}

at::Tensor sparse_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& idx, int64_t block_size, int64_t q_offset,
                          int64_t rows, int64_t max_keys, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && idx.dim() == 3,
              "sparse_forward: expected q [N,T,H], k/v [K,S,H], idx [K,T,k]");
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  idx.scalar_type() == at::kInt,
              "sparse_forward: q/k/v must all be float32 or all bfloat16, idx int32");
  TORCH_CHECK(q.device().is_cpu(), "sparse_forward: CPU tensors only");
  const int64_t N = q.size(0), T = q.size(1), H = q.size(2);
  const int64_t K = k.size(0), S = k.size(1);
  TORCH_CHECK(K > 0 && N % K == 0 && k.sizes() == v.sizes() && k.size(2) == H,
              "sparse_forward: inconsistent q/k/v shapes");
  TORCH_CHECK(idx.size(0) == K && idx.size(1) == T, "sparse_forward: idx must be [K, T, k]");
  TORCH_CHECK(S == q_offset + T, "sparse_forward: keys must be the whole prefix");
  TORCH_CHECK(rows >= 1 && rows <= kMaxRows, "sparse_forward: rows must be in [1, 256]");
  TORCH_CHECK(max_keys >= block_size, "sparse_forward: max_keys < block_size");
  auto out = at::zeros({N, T, H}, q.options().dtype(at::kFloat));
  if (T == 0) return out;
  if (q.scalar_type() == at::kBFloat16) {
    run_groups<at::BFloat16>(q, k, v, idx, out, block_size, q_offset, rows, max_keys, scale);
  } else {
    run_groups<float>(q, k, v, idx, out, block_size, q_offset, rows, max_keys, scale);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(minicpm4_sparse_attn, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor idx, int block_size, int q_offset, "
        "int rows, int max_keys, float scale) -> Tensor",
        &sparse_forward);
}
