// Row-major fp32 matrix products through MKL's sgemm, which libtorch_cpu exports, and the
// work split that runs them, for the C++ CPU kernels (docs/kernels.md). Included by
// sparse_attn.cpp and sparse_select.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);
// MKL's per-thread thread count: every sgemm in our kernels runs single-threaded inside
// their own OpenMP work split. Without it a one-item call (a decode step) lets MKL start
// its own threads per small product, which stalls badly when the cores are busy.
extern "C" int MKL_Set_Num_Threads_Local(int nt);

namespace minicpm4_mkl {

// C[M, N] = A[M, Kd] @ B[N, Kd]^T (row-major, leading dims given).
inline void gemm_nt(int M, int N, int Kd, const float* A, int lda, const float* B, int ldb,
                    float* C, int ldc) {
  const float one = 1.f, zero = 0.f;
  sgemm_("T", "N", &N, &M, &Kd, &one, B, &ldb, A, &lda, &zero, C, &ldc);
}

// C[M, N] = A[M, Kd] @ B[Kd, N] (row-major, leading dims given).
inline void gemm_nn(int M, int N, int Kd, const float* A, int lda, const float* B, int ldb,
                    float* C, int ldc) {
  const float one = 1.f, zero = 0.f;
  sgemm_("N", "N", &N, &M, &Kd, &one, B, &ldb, A, &lda, &zero, C, &ldc);
}

// Runs fn(w, ws) for w in [0, items) on torch's threads: a dynamic OpenMP schedule (items may
// differ a lot in cost; callers order them expensive first), one Workspace per thread reused
// across its items, and MKL pinned to one thread inside each worker.
template <typename Workspace, typename Fn>
void parallel_items(int64_t items, Fn&& fn) {
  const int nthreads = std::max(1, std::min<int>(at::get_num_threads(), int(items)));
#pragma omp parallel num_threads(nthreads)
  {
    Workspace ws;
    const int mkl_prev = MKL_Set_Num_Threads_Local(1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < items; ++w) fn(w, ws);
    MKL_Set_Num_Threads_Local(mkl_prev);
  }
}

}  // namespace minicpm4_mkl
