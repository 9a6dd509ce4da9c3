// Fused rotate-half RoPE for bf16 CPU inference (issue 5, decode overhead; spec §1.3).
//
// `model/layers.apply_rotary` is ~10 small ops per call (widen, two slices, neg, cat, two
// muls, add, narrow); a decode step calls it twice per layer. This op computes, per element,
// exactly the reference's arithmetic: widen x to fp32, out = x * cos + rotate_half(x) * sin
// (two fp32 products, then their sum: no fused multiply-add), rounded to bf16 once; so its
// result equals the reference's bit for bit.
// x [B, T, N, H] bf16 (the projection's layout, before the head transpose), cos / sin
// [B, T, H] fp32; rotate_half(x)[h] = -x[h + H/2] for h < H/2, x[h - H/2] otherwise.
// Shape legend: B rows, T tokens, N heads, H head dim.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int64_t kMinElementsPerThread = 1 << 15;

// One token's N heads. No contraction of x * c + r * s into an FMA: the reference rounds
// both products to fp32 before adding them.
__attribute__((optimize("fp-contract=off"))) void rotate_token(
    const c10::BFloat16* x_NH, const float* cos_H, const float* sin_H, c10::BFloat16* y_NH,
    int64_t N, int64_t H) {
  const int64_t half = H / 2;
  for (int64_t n = 0; n < N; ++n) {
    const c10::BFloat16* x = x_NH + n * H;
    c10::BFloat16* y = y_NH + n * H;
    for (int64_t h = 0; h < H; ++h) {
      const float xv = static_cast<float>(x[h]);
      const float rot = h < half ? -static_cast<float>(x[h + half])
                                 : static_cast<float>(x[h - half]);
      const float a = xv * cos_H[h];
      const float b = rot * sin_H[h];
      y[h] = c10::BFloat16(a + b);
    }
  }
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
              "rotary: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rotary: x must be bfloat16");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rotary: cos and sin must be float32");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && cos.sizes() == sin.sizes() &&
                  cos.size(0) == x.size(0) && cos.size(1) == x.size(1) &&
                  cos.size(2) == x.size(3) && x.size(3) % 2 == 0,
              "rotary: x [B, T, N, H] (H even) and cos / sin [B, T, H] expected, got ",
              x.sizes(), ", ", cos.sizes(), ", ", sin.sizes());
  const at::Tensor x_c = x.contiguous(), cos_c = cos.contiguous(), sin_c = sin.contiguous();
  at::Tensor y = at::empty_like(x_c);
  const int64_t B = x_c.size(0), T = x_c.size(1), N = x_c.size(2), H = x_c.size(3);
  const auto* xp = x_c.data_ptr<c10::BFloat16>();
  const float* cp = cos_c.data_ptr<float>();
  const float* sp = sin_c.data_ptr<float>();
  auto* yp = y.data_ptr<c10::BFloat16>();
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(N * H, 1));
  at::parallel_for(0, B * T, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      rotate_token(xp + t * N * H, cp + t * H, sp + t * H, yp + t * N * H, N, H);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(minicpm4_rotary, m) {
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor", &rotary);
}
