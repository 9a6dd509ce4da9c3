"""Memory read ceiling of this machine for the threads torch uses (issue 5 #5: the bound on
bf16 decode speed).

A decode step reads every weight once, so tokens/s cannot exceed read bandwidth / weight
bytes. This times a plain C++ loop (64-byte loads summed, OpenMP over torch's thread count,
built with torch.utils.cpp_extension) reading a buffer well beyond the last-level cache, in
the access patterns that matter: one sequential stream per thread, 4 and 32 interleaved
streams per thread (with and without a software prefetch 512 bytes ahead), and rows of 2 KB
read 32 at a time in lockstep (the AMX skinny GEMM's pattern at K = 1024). Prints GB/s per
pattern (best of 3) and last `RESULT memory_read_gbps=<best pattern>`.
Usage: python benchmarks/memory_read.py [--gb 2]
"""

from __future__ import annotations

import argparse
import platform
import tempfile

import torch
from torch.utils.cpp_extension import load_inline

_SRC = r"""
#include <torch/extension.h>
#include <omp.h>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// One 64-byte line added into the 8 lanes of acc (a vector add where AVX-512 is compiled in).
static inline void add_line(uint64_t* acc, const char* p) {
#if defined(__AVX512F__)
  const __m512i v = _mm512_add_epi64(_mm512_loadu_si512(acc), _mm512_loadu_si512(p));
  _mm512_storeu_si512(acc, v);
#else
  const uint64_t* q = reinterpret_cast<const uint64_t*>(p);
  for (int i = 0; i < 8; ++i) acc[i] += q[i];
#endif
}

// Sums `bytes` of the buffer as uint64 lanes: per thread its own contiguous share, cut into
// `streams` parts read in lockstep (`row` bytes per part per turn when row > 0: rows of that
// size, `streams` rows at a time, then the next rows).
double read_gbps(torch::Tensor buf, int64_t streams, int64_t row, int64_t prefetch) {
  const char* base = static_cast<const char*>(buf.data_ptr());
  const int64_t n = buf.numel();
  uint64_t total = 0;
  const double t0 = omp_get_wtime();
#pragma omp parallel reduction(+ : total) num_threads(at::get_num_threads())
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t share = n / nt;
    const char* b = base + id * share;
    alignas(64) uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (row > 0) {  // tiles of `streams` rows of `row` bytes
      const int64_t tile = streams * row;
      for (int64_t t = 0; t + tile <= share; t += tile)
        for (int64_t off = 0; off < row; off += 64)
          for (int64_t s = 0; s < streams; ++s) add_line(acc, b + t + s * row + off);
    } else {
      const int64_t part = share / streams;
      for (int64_t off = 0; off + 64 <= part; off += 64)
        for (int64_t s = 0; s < streams; ++s) {
          const char* p = b + s * part + off;
          if (prefetch) __builtin_prefetch(p + prefetch);
          add_line(acc, p);
        }
    }
    for (int i = 0; i < 8; ++i) total += acc[i];
  }
  const double dt = omp_get_wtime() - t0;
  volatile uint64_t sink = total;
  (void)sink;
  return n / dt / 1e9;
}
"""

PATTERNS = [  # (label, streams per thread, row bytes, prefetch bytes)
    ("1 stream / thread", 1, 0, 0),
    ("4 streams / thread", 4, 0, 0),
    ("4 streams / thread, prefetch 512 B", 4, 0, 512),
    ("32 streams / thread", 32, 0, 0),
    ("32 rows of 2 KB in lockstep", 32, 2048, 0),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="buffer size (beyond the LLC)")
    args = ap.parse_args()
    ext = load_inline("minicpm4_bench_memory_read", cpp_sources=_SRC, functions=["read_gbps"],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"],
                      extra_ldflags=["-fopenmp"], build_directory=tempfile.mkdtemp())
    buf = torch.ones(int(args.gb * 2**30), dtype=torch.uint8)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {args.gb:g} GB buffer")
    best = 0.0
    for label, streams, row, prefetch in PATTERNS:
        gbps = max(ext.read_gbps(buf, streams, row, prefetch) for _ in range(3))
        best = max(best, gbps)
        print(f"{label:>36}: {gbps:6.1f} GB/s", flush=True)
    print(f"RESULT memory_read_gbps={best:.1f}")


if __name__ == "__main__":
    main()
