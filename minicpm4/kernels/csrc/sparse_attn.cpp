// InfLLM v2 stage 2 on CPU: fused block-sparse causal attention, forward only
// (spec §2.2 step 6, §2.4; Python side and reference: minicpm4/kernels/infllm_v2/stage2_cpp.py).
//
// Work item = (kv head, row group): R <= 256 consecutive query positions, aligned to
// multiples of R. For each key block, a bit mask records which rows of the group selected it
// (block ids from idx, -1 and future blocks ignored, duplicates harmless). Consecutive blocks
// with the same row mask form one run of up to max_keys keys. Two inner loops, same math:
// - AVX-512 (sparse_attn_avx512.h; head dims 16-256): each row of a run, all G heads at
//   once, against the run's 64-key chunks with register-tiled products, a vectorised online
//   softmax and P @ V into the row's accumulator (K^T prepared once per prefill);
// - MKL: per run, the queries of the masked rows (M = popcount * G) are packed, scored with
//   one sgemm, folded into the online softmax, and P @ V is added with a second sgemm.
// Both mask causally where a run reaches a row's own position. No key outside a row's
// selection is scored: the FLOPs are exactly the selected ones. fp32 or bf16 in, fp32 math
// and out; one thread per work item (OpenMP, dynamic; MKL single-threaded inside).
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
#include <type_traits>
#include <vector>

#include "mkl_gemm.h"
#include "sparse_attn_avx512.h"

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
  std::vector<float> q, s, o, acc, m, l, kbuf, vbuf, alpha;
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

// Rows of a row group that are real queries: [r0, r0 + nrows) relative to g0 = grp * R.
struct GroupRows {
  int64_t g0, r0, nrows;
};

inline GroupRows group_rows(int64_t grp, int64_t R, int64_t q_offset, int64_t T) {
  const int64_t g0 = grp * R;  // first position of the group (absolute, aligned to R)
  const int64_t p0 = std::max(g0, q_offset), p1 = std::min(g0 + R, q_offset + T);
  return {g0, p0 - g0, std::max<int64_t>(p1 - p0, 0)};
}

// Steps 1-2: row masks per key block, then runs of consecutive blocks with the same rows.
void build_runs(const int32_t* idx_KTk, int64_t T, int64_t S, int64_t slots, int64_t bs,
                int64_t q_offset, int64_t max_keys, int64_t kh, const GroupRows& gr,
                Workspace& ws) {
  const int64_t nb = (S + bs - 1) / bs;
  ws.mask.assign(nb, RowMask{});
  ws.touched.clear();
  for (int64_t r = gr.r0; r < gr.r0 + gr.nrows; ++r) {
    const int64_t pos = gr.g0 + r, t = pos - q_offset;
    const int32_t* row = idx_KTk + (kh * T + t) * slots;
    for (int64_t j = 0; j < slots; ++j) {
      const int64_t b = row[j];
      if (b < 0 || b >= nb || b * bs > pos) continue;
      if (!any_row(ws.mask[b])) ws.touched.push_back(b);
      ws.mask[b][r >> 6] |= uint64_t(1) << (r & 63);
    }
  }
  std::sort(ws.touched.begin(), ws.touched.end());
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
}

// Step 3 on the MKL path: per run, the rows' queries packed into one sgemm.
template <typename scalar_t>
void mkl_runs(const scalar_t* q_NTH, const scalar_t* k_SH, const scalar_t* v_SH, int64_t G,
              int64_t T, int64_t H, int64_t q_offset, float scale, int64_t kh,
              const GroupRows& gr, Workspace& ws) {
  const int64_t g0 = gr.g0, r0 = gr.r0, nrows = gr.nrows;
  const int64_t Mmax = nrows * G;
  ws.q.resize(Mmax * H);
  ws.o.resize(Mmax * H);
  ws.packed_state.resize(Mmax);
  int64_t Lmax = 0;
  for (const Run& run : ws.runs) Lmax = std::max(Lmax, run.key1 - run.key0);
  ws.s.resize(Mmax * std::max<int64_t>(Lmax, 1));
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
}

#if defined(__AVX512F__)
// Step 3 on the AVX-512 path (sparse_attn_avx512.h): every selecting row of a run against
// the run's 64-key chunks. kt_CHc: K transposed per chunk for this kv head, or null (then
// each chunk is transposed here); v32_SH: fp32 V of this kv head, or null (bf16 V is then
// converted per chunk).
template <typename scalar_t>
void avx512_runs(const scalar_t* q_NTH, const scalar_t* k_SH, const scalar_t* v_SH,
                 const float* kt_CHc, const float* v32_SH, int64_t G, int64_t T, int64_t S,
                 int64_t H, int64_t q_offset, float scale, int64_t kh, const GroupRows& gr,
                 Workspace& ws) {
  namespace av = minicpm4_avx512;
  constexpr int64_t C = av::kChunk;
  const int64_t g0 = gr.g0, r0 = gr.r0, nrows = gr.nrows;
  ws.q.resize(nrows * G * H);  // every row's scaled queries, once per group
  for (int64_t r = r0; r < r0 + nrows; ++r) {
    const int64_t t = g0 + r - q_offset;
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t* src = q_NTH + ((kh * G + g) * T + t) * H;
      float* dst = ws.q.data() + ((r - r0) * G + g) * H;
      for (int64_t h = 0; h < H; ++h) dst[h] = float(src[h]) * scale;
    }
  }
  ws.s.resize(G * C);
  ws.alpha.resize(G);
  ws.kbuf.resize(H * C);
  ws.vbuf.resize(H * C);
  for (const Run& run : ws.runs) {
    for (int64_t c0 = run.key0 / C * C; c0 < run.key1; c0 += C) {
      const int64_t lo = std::max(run.key0, c0), hi = std::min(run.key1, c0 + C);
      const float* kt = kt_CHc;
      if (kt != nullptr) {
        kt += (c0 / C) * H * C;
      } else {
        av::transpose_chunk(k_SH + c0 * H, std::min(C, S - c0), H, ws.kbuf.data());
        kt = ws.kbuf.data();
      }
      const float* v = nullptr;  // rows relative to c0
      if (v32_SH != nullptr) {
        v = v32_SH + c0 * H;
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        v = v_SH + c0 * H;
      } else {
        for (int64_t i = (lo - c0) * H; i < (hi - c0) * H; ++i)
          ws.vbuf[i] = float(v_SH[c0 * H + i]);
        v = ws.vbuf.data();
      }
      for (int64_t w = 0; w < int64_t(run.rows.size()); ++w) {
        for (uint64_t bits = run.rows[w]; bits; bits &= bits - 1) {
          const int64_t r = w * 64 + __builtin_ctzll(bits);
          const int64_t row_hi = std::min(hi, g0 + r + 1);  // causal: keys <= position
          if (row_hi <= lo) continue;
          const int64_t st = (r - r0) * G;
          av::row_chunk(ws.q.data() + st * H, kt, v, lo - c0, row_hi - c0, G, H,
                        ws.s.data(), ws.alpha.data(), ws.m.data() + st, ws.l.data() + st,
                        ws.acc.data() + st * H);
        }
      }
    }
  }
}
#endif

template <typename scalar_t>
void group_forward(const scalar_t* q_NTH, const scalar_t* k_KSH, const scalar_t* v_KSH,
                   const int32_t* idx_KTk, float* out_NTH, const float* kt_KCHc,
                   const float* v32_KSH, int64_t N, int64_t K, int64_t T, int64_t S, int64_t H,
                   int64_t slots, int64_t bs, int64_t q_offset, int64_t R, int64_t max_keys,
                   float scale, bool fast, int64_t kh, int64_t grp, Workspace& ws) {
  const int64_t G = N / K;
  const GroupRows gr = group_rows(grp, R, q_offset, T);
  if (gr.nrows == 0) return;
  build_runs(idx_KTk, T, S, slots, bs, q_offset, max_keys, kh, gr, ws);
  // Online softmax state per (row, head): index (r - r0) * G + g.
  const int64_t Mmax = gr.nrows * G;
  ws.acc.assign(Mmax * H, 0.f);
  ws.m.assign(Mmax, kNegInf);
  ws.l.assign(Mmax, 0.f);
  const scalar_t* k_SH = k_KSH + kh * S * H;
  const scalar_t* v_SH = v_KSH + kh * S * H;
#if defined(__AVX512F__)
  if (fast) {
    const int64_t nch = (S + minicpm4_avx512::kChunk - 1) / minicpm4_avx512::kChunk;
    avx512_runs(q_NTH, k_SH, v_SH,
                kt_KCHc ? kt_KCHc + kh * nch * H * minicpm4_avx512::kChunk : nullptr,
                v32_KSH ? v32_KSH + kh * S * H : nullptr, G, T, S, H, q_offset, scale, kh, gr,
                ws);
  } else {
    mkl_runs(q_NTH, k_SH, v_SH, G, T, H, q_offset, scale, kh, gr, ws);
  }
#else
  mkl_runs(q_NTH, k_SH, v_SH, G, T, H, q_offset, scale, kh, gr, ws);
#endif
  // Step 4: normalise and write out; rows with no visible key give 0.
  for (int64_t r = gr.r0; r < gr.r0 + gr.nrows; ++r) {
    const int64_t t = gr.g0 + r - q_offset;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t st = (r - gr.r0) * G + g;
      const float inv = ws.l[st] > 0.f ? 1.f / ws.l[st] : 0.f;
      const float* acc = ws.acc.data() + st * H;
      float* dst = out_NTH + ((kh * G + g) * T + t) * H;
      for (int64_t h = 0; h < H; ++h) dst[h] = acc[h] * inv;
    }
  }
}

// Calls with at least this many queries prepare K^T (and fp32 V) for the whole sequence.
constexpr int64_t kPrepareRows = 256;

// Whether this build runs the AVX-512 path for this head dim.
bool has_avx512_path(int64_t H) {
#if defined(__AVX512F__)
  return minicpm4_avx512::supports_head_dim(H);
#else
  (void)H;
  return false;
#endif
}

template <typename scalar_t>
void run_groups(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& idx, at::Tensor& out, int64_t block_size, int64_t q_offset,
                int64_t rows, int64_t max_keys, double scale, bool fast) {
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
  // A prefill transposes K (and converts bf16 V) once; a short call (a decode step) only
  // touches the chunks it reads.
  at::Tensor kt, v32;
#if defined(__AVX512F__)
  if (fast && T >= kPrepareRows) {
    constexpr int64_t C = minicpm4_avx512::kChunk;
    const int64_t nch = (S + C - 1) / C;
    kt = at::empty({K, nch, H, C}, q.options().dtype(at::kFloat));
    float* ktp = kt.data_ptr<float>();
    at::parallel_for(0, K * nch, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t kh = i / nch, c0 = (i % nch) * C;
        minicpm4_avx512::transpose_chunk(kp + (kh * S + c0) * H, std::min(C, S - c0), H,
                                         ktp + i * H * C);
      }
    });
    if constexpr (!std::is_same_v<scalar_t, float>) v32 = vc.to(at::kFloat);
  }
#endif
  const float* ktp = kt.defined() ? kt.data_ptr<float>() : nullptr;
  const float* v32p = v32.defined() ? v32.data_ptr<float>() : nullptr;
  // Late (expensive) groups first, for the dynamic schedule's balance.
  minicpm4_mkl::parallel_items<Workspace>(items, [&](int64_t w, Workspace& ws) {
    group_forward(qp, kp, vp, ip, op, ktp, v32p, N, K, T, S, H, slots, block_size, q_offset,
                  rows, max_keys, float(scale), fast, w % K, last - w / K, ws);
  });
}

at::Tensor sparse_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& idx, int64_t block_size, int64_t q_offset,
                          int64_t rows, int64_t max_keys, double scale, bool avx512) {
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
  // A short bf16 call (a decode step) keeps the MKL path: converting and transposing each
  // chunk it reads costs more than the packed sgemm loses (64K decode step, 2 threads:
  // bf16 2.03 ms AVX-512 vs 1.49 ms MKL; fp32 1.44 vs 1.92 ms).
  const bool fast = avx512 && has_avx512_path(H) &&
                    (T >= kPrepareRows || q.scalar_type() == at::kFloat);
  if (q.scalar_type() == at::kBFloat16) {
    run_groups<at::BFloat16>(q, k, v, idx, out, block_size, q_offset, rows, max_keys, scale,
                             fast);
  } else {
    run_groups<float>(q, k, v, idx, out, block_size, q_offset, rows, max_keys, scale, fast);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(minicpm4_sparse_attn, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor idx, int block_size, int q_offset, "
        "int rows, int max_keys, float scale, bool avx512) -> Tensor",
        &sparse_forward);
  m.def("has_avx512_path(int head_dim) -> bool", &has_avx512_path);
}
