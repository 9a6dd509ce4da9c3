// AMX-BF16 path of the skinny GEMM (included by skinny_gemm.cpp; see its header comment).
//
// On CPUs with AMX (Sapphire Rapids and later) one TDPBF16PS multiplies a 16 x 32 bf16 tile
// by a 32 x 16 one: 1 KB of weights per instruction, far above what memory delivers, so the
// kernel streams the weights at memory speed for every M up to kMaxRows, where the
// AVX-512 BF16 path becomes compute-bound from M ~ 8 on.
//
// The product is computed transposed, y^T[N, M] = w[N, K] @ x^T[K, M], so that the weight is
// the A operand and is loaded straight from its nn.Linear [N, K] layout (16 rows x 64 bytes,
// row stride 2K bytes): no repacked copy of the weights. x^T is the B operand, which AMX wants
// in pairs along K ("VNNI" layout): x is repacked once per call into xp[K / 2][M][2] (small).
// A group is 32 weight rows (two A tiles) x up to 32 rows of x (one or two B tiles of up to
// 16 columns); the four C tiles (2 row blocks x 2 column blocks) hold fp32 sums over the
// whole K, are stored to a small buffer, + bias, rounded to bf16 once and written transposed.
// M > 32 runs in passes of 32 rows of x over each chunk of groups: the first pass reads the
// chunk's weights from memory, the others from L2 (the Python side sends at most 160 rows
// here, `skinny_linear.MAX_ROWS_AMX`, beyond which oneDNN's GEMM is faster).
// Weight rows beyond the last full group of 32 (N % 32) go to the AVX-512 path.
// Every M from 1 to kMaxRows takes this path, although at M <= 2 the AVX-512 one is as fast
// from memory and ~25% faster from cache (1024 x 1024 weight in L2: 17 vs 22 us at M = 1):
// an element's sum is then computed the same way whatever the batch, so a request decodes
// the same tokens alone or among others.
// Needs K % 32 == 0 and the kernel's permission to use the tile registers (Linux
// arch_prctl(ARCH_REQ_XCOMP_PERM)); `amx_usable` says whether both hold.
// Shape legend: M activation rows, N output features (weight rows), K inner dimension.

#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define SKINNY_HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#include <omp.h>

#include <atomic>

#include "avx512_math.h"

namespace amx {

constexpr int64_t kMaxRows = 256;  // rows of x: passes of up to 32 columns (2 B tiles)
constexpr int64_t kPassCols = 32;
constexpr int64_t kGroupRows = 32;  // weight rows per group: two A tiles
constexpr int64_t kStepK = 32;      // bf16 elements of K per TDPBF16PS
// No software prefetch: the hardware prefetchers alone stream the 32 rows of a group faster.
// Measured on a 2-vCPU Xeon (weights cycled through 1.2 GB, beyond the 480 MB L3): prefetching
// each row 256 bytes ahead gave 20.7-22.1 GB/s on the 4096 x 1024 weight at M = 1, none
// 23.0-24.1; from L3 (48 MB of weights), the 73448 x 256 LM head 16.8-18.3 vs 23.0-23.2.

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The OS must grant each process the tile-data state once (Linux >= 5.16); torch's oneDNN
// asks too, so this is usually already granted.
inline bool os_permits() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

inline bool usable(const Problem& p) {
  return p.M <= kMaxRows && p.K % kStepK == 0 && p.N >= kGroupRows && os_permits();
}

// Tiles: 0..3 = C[row block r][column block c] at 2 r + c; 4, 5 = B column blocks; 6, 7 = A.
inline void configure(int64_t M) {
  TileConfig cfg;
  const int64_t cols0 = std::min<int64_t>(M, 16), cols1 = M - cols0;
  for (int t = 0; t < 4; ++t) {
    const int64_t cols = (t % 2 == 0) ? cols0 : cols1;
    cfg.rows[t] = cols > 0 ? 16 : 0;
    cfg.colsb[t] = static_cast<uint16_t>(cols * 4);
  }
  cfg.rows[4] = 16;
  cfg.colsb[4] = static_cast<uint16_t>(cols0 * 4);
  cfg.rows[5] = cols1 > 0 ? 16 : 0;
  cfg.colsb[5] = static_cast<uint16_t>(cols1 * 4);
  cfg.rows[6] = cfg.rows[7] = 16;
  cfg.colsb[6] = cfg.colsb[7] = 64;
  _tile_loadconfig(&cfg);
}

// y[m0 + j, n0 .. n0 + 15] = column j of c_16x16 (+ bias) for j < cols: the block is
// transposed in registers, + bias, rounded to bf16, one 32-byte store per row of y.
inline void store_block(const Problem& p, const float* c_16x16, int64_t n0, int64_t m0,
                        int64_t cols) {
  __m512 bias_16 = _mm512_setzero_ps();
  if (p.bias_N != nullptr) {
    const __m256i b16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.bias_N + n0));
    bias_16 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b16), 16));
  }
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(c_16x16 + 16 * i);
  transpose16(r);
  for (int64_t j = 0; j < cols; ++j) {
    const __m512 v = _mm512_add_ps(r[j], bias_16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.y_MN + (m0 + j) * p.N + n0),
                        (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// M = 1: y[0, n0 .. n0 + 31] = c_32 (+ bias), rounded to bf16, one 64-byte store.
inline void store_row32(const Problem& p, const float* c_32, int64_t n0) {
  __m512 lo = _mm512_load_ps(c_32), hi = _mm512_load_ps(c_32 + 16);
  if (p.bias_N != nullptr) {
    const __m512i b32 = _mm512_loadu_si512(static_cast<const void*>(p.bias_N + n0));
    lo = _mm512_add_ps(lo, _mm512_castsi512_ps(_mm512_slli_epi32(
                               _mm512_cvtepu16_epi32(_mm512_castsi512_si256(b32)), 16)));
    hi = _mm512_add_ps(hi, _mm512_castsi512_ps(_mm512_slli_epi32(
                               _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(b32, 1)), 16)));
  }
  _mm512_storeu_si512(static_cast<void*>(p.y_MN + n0), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// Groups [g_begin, g_end) of kGroupRows weight rows; xp_K2M2 = x repacked (see header).
// The calling thread has loaded the tile configuration (`configure`).
// The pass covers columns (rows of x) m0 .. m0 + cols - 1, cols <= 32, and the tiles are
// configured for `cols` (`configure(cols)`).
template <bool TwoColumnBlocks>
void groups(const Problem& p, const uint16_t* xp_K2M2, int64_t g_begin, int64_t g_end,
            int64_t m0, int64_t cols) {
  alignas(64) float c_16x16[16 * 16];
  const int64_t w_stride = p.K * 2, x_stride = p.M * 4;  // bytes between tile rows
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t n0 = g * kGroupRows;
    const uint16_t* w0 = p.w_NK + n0 * p.K;
    const uint16_t* w1 = w0 + 16 * p.K;
    _tile_zero(0);
    _tile_zero(2);
    if (TwoColumnBlocks) {
      _tile_zero(1);
      _tile_zero(3);
    }
    for (int64_t k = 0; k < p.K; k += kStepK) {
      const uint16_t* xk = xp_K2M2 + (k / 2) * p.M * 2 + m0 * 2;
      _tile_loadd(4, xk, x_stride);
      if (TwoColumnBlocks) _tile_loadd(5, xk + 16 * 2, x_stride);
      _tile_loadd(6, w0 + k, w_stride);
      _tile_loadd(7, w1 + k, w_stride);
      _tile_dpbf16ps(0, 6, 4);
      _tile_dpbf16ps(2, 7, 4);
      if (TwoColumnBlocks) {
        _tile_dpbf16ps(1, 6, 5);
        _tile_dpbf16ps(3, 7, 5);
      }
    }
    if (p.M == 1) {  // each C tile is one column: stored densely it is 16 outputs in a row
      _tile_stored(0, c_16x16, 4);
      _tile_stored(2, c_16x16 + 16, 4);
      store_row32(p, c_16x16, n0);
      continue;
    }
    const int64_t cols0 = std::min<int64_t>(cols, 16);
    _tile_stored(0, c_16x16, 64);
    store_block(p, c_16x16, n0, m0, cols0);
    _tile_stored(2, c_16x16, 64);
    store_block(p, c_16x16, n0 + 16, m0, cols0);
    if (TwoColumnBlocks) {
      _tile_stored(1, c_16x16, 64);
      store_block(p, c_16x16, n0, m0 + 16, cols - 16);
      _tile_stored(3, c_16x16, 64);
      store_block(p, c_16x16, n0 + 16, m0 + 16, cols - 16);
    }
  }
}

// xp[kp][m] = the pair x[m, 2 kp .. 2 kp + 1]: a transpose of x seen as [M, K / 2] uint32,
// in blocks of 16 x 16 pairs transposed in registers. For M = 1 it is x itself (xp is left
// empty).
inline const uint16_t* repack(const Problem& p, std::vector<uint16_t>& xp) {
  if (p.M == 1) return p.x_MK;
  xp.resize(static_cast<size_t>(p.M * p.K));
  const int64_t K2 = p.K / 2;  // a multiple of 16 (K % 32 == 0)
  const float* x32 = reinterpret_cast<const float*>(p.x_MK);
  float* xp32 = reinterpret_cast<float*>(xp.data());
  for (int64_t m0 = 0; m0 < p.M; m0 += 16) {
    const int64_t rows = std::min<int64_t>(16, p.M - m0);
    const __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1);
    for (int64_t kp0 = 0; kp0 < K2; kp0 += 16) {
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_loadu_ps(x32 + (m0 + i) * K2 + kp0) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t i = 0; i < 16; ++i)
        _mm512_mask_storeu_ps(xp32 + (kp0 + i) * p.M + m0, mask, r[i]);
    }
  }
  return xp.data();
}

// Work claiming for `run_many`: the chunks are cut into one contiguous segment per thread;
// a thread claims its own segment's chunks front to back (its weights stream in address
// order, which the hardware prefetchers follow best), then takes chunks from the back of
// the other segments (so a thread descheduled for a while leaves its remaining chunks to
// the others instead of making the whole call wait for it).
class Claims {
 public:
  Claims(int64_t chunks, int threads) : segs_(static_cast<size_t>(threads)) {
    for (int t = 0; t < threads; ++t)
      segs_[static_cast<size_t>(t)].range.store(pack(chunks * t / threads,
                                                     chunks * (t + 1) / threads));
  }
  // The next chunk for thread t, or -1 when none is left.
  int64_t next(int t) {
    const int n = static_cast<int>(segs_.size());
    if (int64_t c = take(segs_[static_cast<size_t>(t)], true); c >= 0) return c;
    for (int d = 1; d < n; ++d)
      if (int64_t c = take(segs_[static_cast<size_t>((t + d) % n)], false); c >= 0) return c;
    return -1;
  }

 private:
  struct alignas(64) Segment {
    std::atomic<uint64_t> range;  // front (high 32 bits), back (low 32 bits): [front, back)
  };
  static uint64_t pack(int64_t front, int64_t back) {
    return (static_cast<uint64_t>(front) << 32) | static_cast<uint64_t>(back);
  }
  static int64_t take(Segment& s, bool front) {
    uint64_t r = s.range.load(std::memory_order_relaxed);
    while (true) {
      const int64_t f = static_cast<int64_t>(r >> 32), b = static_cast<int64_t>(r & 0xffffffffu);
      if (f >= b) return -1;
      const uint64_t next = front ? pack(f + 1, b) : pack(f, b - 1);
      if (s.range.compare_exchange_weak(r, next, std::memory_order_relaxed))
        return front ? f : b - 1;
    }
  }
  std::vector<Segment> segs_;
};

// Runs the full groups of every problem (all sharing x: same x_MK, M and K) on AMX in one
// parallel region, then each problem's remaining N % 32 rows with `tail(problem,
// first_tile, end)` (the AVX-512 path, in its tiles of kTileN rows). An element's sum is
// computed by the same code whether its weight comes alone or with others.
template <typename Tail>
void run_many(const std::vector<const Problem*>& ps, Tail tail) {
  std::vector<uint16_t> xp;
  const uint16_t* xp_K2M2 = repack(*ps[0], xp);
  const int64_t M = ps[0]->M;
  // Chunks of groups are claimed through `Claims`: each thread streams its own contiguous
  // segment, then helps with the others' (on a machine where the server's event loop or
  // clients share the cores, a thread descheduled for a while does not make the call wait).
  // Measured against claiming one chunk at a time from a shared counter (threads
  // interleaved in memory), 0.5B / demo shapes, 2-vCPU Xeon: 1.02-1.12x at M = 1..64.
  struct Chunk {
    const Problem* p;
    int64_t g0, g1;
  };
  std::vector<Chunk> work;
  for (const Problem* p : ps) {
    const int64_t full = p->N / kGroupRows;
    const int64_t chunk =
        std::max<int64_t>(1, kMinWorkPerThread / (kGroupRows * std::max<int64_t>(p->K, 1)));
    for (int64_t g0 = 0; g0 < full; g0 += chunk) work.push_back({p, g0, std::min(full, g0 + chunk)});
  }
  const int64_t chunks = static_cast<int64_t>(work.size());
  // A chunk's weights are read from memory by its first pass of 32 columns and from L2 by
  // the others (a chunk is <= 128 KB of weights for K <= 2048: kMinWorkPerThread * 2 bytes).
  // The tiles are reconfigured only when a pass's column count differs from the last one.
  auto claim = [&](int64_t c, int64_t& configured) {
    const Chunk& w = work[static_cast<size_t>(c)];
    for (int64_t m0 = 0; m0 < M; m0 += kPassCols) {
      const int64_t cols = std::min(kPassCols, M - m0);
      if (cols != configured) {
        configure(cols);
        configured = cols;
      }
      if (cols > 16) groups<true>(*w.p, xp_K2M2, w.g0, w.g1, m0, cols);
      else groups<false>(*w.p, xp_K2M2, w.g0, w.g1, m0, cols);
    }
  };
  const int nthreads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), chunks));
  if (nthreads <= 1 || at::in_parallel_region()) {
    int64_t configured = 0;
    for (int64_t c = 0; c < chunks; ++c) claim(c, configured);
    _tile_release();
  } else {
    Claims claims(chunks, nthreads);
#pragma omp parallel num_threads(nthreads)
    {
      int64_t configured = 0;
      const int t = omp_get_thread_num();
      for (int64_t c = claims.next(t); c >= 0; c = claims.next(t)) claim(c, configured);
      _tile_release();
    }
  }
  for (const Problem* p : ps) {
    const int64_t full = p->N / kGroupRows;
    if (full * kGroupRows < p->N)
      tail(*p, full * kGroupRows / kTileN, (p->N + kTileN - 1) / kTileN);
  }
}

}  // namespace amx
#endif
