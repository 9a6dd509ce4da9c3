// Fused RMSNorm and residual-add + RMSNorm for bf16 CPU inference (issue 5, decode overhead).
//
// A decode step of a small model spends much of its time dispatching small ops: the PyTorch
// RMSNorm of `model/layers.py` is 7 of them (float, pow, mean, add, rsqrt, mul, to, and the
// weight's mul), a scaled residual add 2 more. These ops compute the same values in one pass
// per row, with the reference's roundings (kernels/fused_norm.py states them):
//   rms_norm:      y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))
//   add_rms_norm:  x' = bf16(x + bf16(r * scale)), y = rms_norm(x')  -> (x', y)
// Sums are fp32 (their order differs from torch's, so y may differ by one bf16 ulp).
// Rows are split between torch's threads when there are enough elements.
// Shape legend: R rows, D features.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kMinElementsPerThread = 1 << 15;

inline float bf(c10::BFloat16 v) { return static_cast<float>(v); }

// y_D = w * bf16(x * rstd) for one row held in fp32 (x32_D: the row's values, already rounded
// to bf16 where the reference rounds them).
inline void norm_row(const float* x32_D, const c10::BFloat16* w_D, c10::BFloat16* y_D,
                     int64_t D, float eps) {
  float ss = 0.f;
  for (int64_t d = 0; d < D; ++d) ss += x32_D[d] * x32_D[d];
  const float rstd = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t d = 0; d < D; ++d) {
    const float normed = bf(c10::BFloat16(x32_D[d] * rstd));
    y_D[d] = c10::BFloat16(bf(w_D[d]) * normed);
  }
}

void check(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, op,
              ": x and weight must be bfloat16");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && x.size(-1) == w.size(0), op,
              ": x [..., D] and weight [D] expected, got ", x.sizes(), " and ", w.sizes());
}

template <typename Fn>
void rows(int64_t R, int64_t D, Fn&& fn) {
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(D, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> x32(static_cast<size_t>(D));
    for (int64_t r = r0; r < r1; ++r) fn(r, x32.data());
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check(x, w, "rms_norm");
  const at::Tensor x_c = x.contiguous(), w_c = w.contiguous();
  at::Tensor y = at::empty_like(x_c);
  const int64_t D = x_c.size(-1), R = D == 0 ? 0 : x_c.numel() / D;
  const auto* xp = x_c.data_ptr<c10::BFloat16>();
  const auto* wp = w_c.data_ptr<c10::BFloat16>();
  auto* yp = y.data_ptr<c10::BFloat16>();
  rows(R, D, [&](int64_t r, float* x32) {
    for (int64_t d = 0; d < D; ++d) x32[d] = bf(xp[r * D + d]);
    norm_row(x32, wp, yp + r * D, D, static_cast<float>(eps));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& r,
                                                double scale, const at::Tensor& w, double eps) {
  check(x, w, "add_rms_norm");
  TORCH_CHECK(r.sizes() == x.sizes() && r.scalar_type() == at::kBFloat16 && r.device().is_cpu(),
              "add_rms_norm: the residual branch must be a bfloat16 CPU tensor shaped like x, "
              "got ", r.sizes());
  const at::Tensor x_c = x.contiguous(), r_c = r.contiguous(), w_c = w.contiguous();
  at::Tensor x_new = at::empty_like(x_c), y = at::empty_like(x_c);
  const int64_t D = x_c.size(-1), R = D == 0 ? 0 : x_c.numel() / D;
  const auto* xp = x_c.data_ptr<c10::BFloat16>();
  const auto* rp = r_c.data_ptr<c10::BFloat16>();
  const auto* wp = w_c.data_ptr<c10::BFloat16>();
  auto* xnp = x_new.data_ptr<c10::BFloat16>();
  auto* yp = y.data_ptr<c10::BFloat16>();
  const float s = static_cast<float>(scale);
  rows(R, D, [&](int64_t row, float* x32) {
    for (int64_t d = 0; d < D; ++d) {
      const int64_t i = row * D + d;
      const c10::BFloat16 sum(bf(xp[i]) + bf(c10::BFloat16(bf(rp[i]) * s)));
      xnp[i] = sum;
      x32[d] = bf(sum);
    }
    norm_row(x32, wp, yp + row * D, D, static_cast<float>(eps));
  });
  return {x_new, y};
}

}  // namespace

TORCH_LIBRARY(minicpm4_rms_norm, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor r, float scale, Tensor w, float eps) -> (Tensor, Tensor)",
        &add_rms_norm);
}
