// The lean decode forward's loop over the layers, in C++ (issue 5; model/fast_decode.py).
//
// A decode step of a small model on CPU spends a good part of its time in the Python that
// calls its kernels: ~15 op calls per layer, each a few microseconds of interpreter and
// dispatch work (cProfile: ~0.4 ms of a ~2.4 ms demo-model step in `decode_logits`' own
// bytecode). This op runs the same calls, with the same arguments and in the same order as
// `fast_decode.decode_logits`' Python loop, through the dispatcher from C++: the fused norms,
// the skinny GEMM (q/k/v and gate/up as one `linear_multi` each), the fused RoPE, the page
// writes (`index_copy_` at the new tokens' slots), the paged decode attention, and ATen's
// silu / mul / add. So its result is bit-identical to that loop (tests/model/
// test_fast_decode.py), which stays as the reference. One difference in the calls: a
// layer's residual add `x + mlp * scale` and the next layer's input norm run as one
// `add_rms_norm` (the attention's residual and post-attention norm already do), which
// rounds as those ops do: bf16(x + bf16(mlp * scale)), then the same norm.
// A row is one new token: a decode row, or a token of a prompt chunk (the token-level step,
// `fast_decode.token_logits`: all the step's keys are written before each layer's attention,
// and a row attends to its sequence's keys up to itself, so it is causal).
// x [B, D] bf16; weights: 9 per layer (input norm, q, k, v, o, post-attention norm, gate, up,
// down); k_pages / v_pages: one [blocks, block_size, K, H] tensor per layer; slots [B] the
// new tokens' slots; table [B, W], lens [B] the rows' block tables and key counts after this
// token; cos / sin [B, 1, H] fp32; eps: 2 per layer; scales: 1 per layer (residual scale).
// GEMMs as `fast_decode._linears` takes them: the skinny GEMM up to max_rows rows, beyond it
// torch's GEMM on the rows zero-padded to bucket_rows (`matmul.bucketed_linear`).
// Shape legend: B rows, D hidden, N query heads, K kv heads, H head dim, F features.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor decode_layers(const at::Tensor& x, at::TensorList weights, at::TensorList k_pages,
                         at::TensorList v_pages, const at::Tensor& slots, const at::Tensor& table,
                         const at::Tensor& lens, const at::Tensor& cos, const at::Tensor& sin,
                         c10::ArrayRef<double> eps, c10::ArrayRef<double> scales,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                         int64_t max_rows, int64_t bucket_rows) {
  const int64_t L = static_cast<int64_t>(scales.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 9 * L &&
                  static_cast<int64_t>(k_pages.size()) == L &&
                  static_cast<int64_t>(v_pages.size()) == L &&
                  static_cast<int64_t>(eps.size()) == 2 * L,
              "decode_layers: 9 weights, 2 eps, one K and one V page tensor per layer expected "
              "(", L, " scales given)");
  TORCH_CHECK(x.dim() == 2, "decode_layers: x [B, D] expected, got ", x.sizes());
  static const auto rms_norm = op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(
      "minicpm4_rms_norm::rms_norm");
  static const auto add_rms_norm =
      op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double,
                                            const at::Tensor&, double)>(
          "minicpm4_rms_norm::add_rms_norm");
  static const auto linear =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&)>(
          "minicpm4_skinny_gemm::linear");
  static const auto linear_multi =
      op<std::vector<at::Tensor>(const at::Tensor&, at::TensorList)>(
          "minicpm4_skinny_gemm::linear_multi");
  static const auto rotary =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "minicpm4_rotary::rotary");
  static const auto attend =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&)>("minicpm4_paged_attention::decode");
  const int64_t B = x.size(0), N = num_heads, K = num_kv_heads, H = head_dim;
  TORCH_CHECK(B <= max_rows || bucket_rows >= B,
              "decode_layers: rows beyond max_rows need bucket_rows >= rows, got ", bucket_rows,
              " for ", B, " rows");
  // fast_decode._linears: the skinny GEMM up to max_rows rows (weights sharing x in one
  // linear_multi call), else torch's GEMM on the rows zero-padded to bucket_rows
  // (matmul.bucketed_linear; bucket_rows == B: no padding)
  auto linears = [&](const at::Tensor& x_BF, std::vector<at::Tensor> ws) {
    if (B <= max_rows) {
      if (ws.size() == 1) return std::vector<at::Tensor>{linear.call(x_BF, ws[0], c10::nullopt)};
      return linear_multi.call(x_BF, ws);
    }
    const at::Tensor x_pad = bucket_rows > B
        ? at::constant_pad_nd(x_BF, {0, 0, 0, bucket_rows - B}) : x_BF;
    std::vector<at::Tensor> ys;
    for (const at::Tensor& w : ws) ys.push_back(at::linear(x_pad, w).narrow(0, 0, B));
    return ys;
  };
  at::Tensor x_BD = x, mlp_BD;  // mlp_BD: the last layer's MLP output, not yet added to x
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + 9 * l;
    at::Tensor h_BD;
    if (l == 0) {
      h_BD = rms_norm.call(x_BD, w[0], eps[0]);
    } else {  // the last layer's residual add and this layer's input norm in one op
      std::tie(x_BD, h_BD) = add_rms_norm.call(x_BD, mlp_BD, scales[l - 1], w[0], eps[2 * l]);
    }
    std::vector<at::Tensor> qkv = linears(h_BD, {w[1], w[2], w[3]});
    at::Tensor q_B1NH = rotary.call(qkv[0].view({B, 1, N, H}), cos, sin);
    at::Tensor k_B1KH = rotary.call(qkv[1].view({B, 1, K, H}), cos, sin);
    at::Tensor v_B1KH = qkv[2].view({B, 1, K, H});
    // PagedBatch.write: pages.view(-1, K, H).index_copy_(0, slots, new [B * 1, K, H])
    k_pages[l].view({-1, K, H}).index_copy_(0, slots, k_B1KH.reshape({B, K, H}));
    v_pages[l].view({-1, K, H}).index_copy_(0, slots, v_B1KH.reshape({B, K, H}));
    at::Tensor o_BNH = attend.call(q_B1NH.view({B, N, H}), k_pages[l], v_pages[l], table, lens);
    auto [x_new, h_new] = add_rms_norm.call(x_BD, linears(o_BNH.view({B, N * H}), {w[4]})[0],
                                            scales[l], w[5], eps[2 * l + 1]);
    std::vector<at::Tensor> gate_up = linears(h_new, {w[6], w[7]});
    at::Tensor act_BF = at::mul(at::silu(gate_up[0]), gate_up[1]);
    x_BD = x_new;
    mlp_BD = linears(act_BF, {w[8]})[0];
  }
  return L == 0 ? x_BD : at::add(x_BD, at::mul(mlp_BD, scales[L - 1]));
}

}  // namespace

TORCH_LIBRARY(minicpm4_decode_layers, m) {
  m.def("decode_layers(Tensor x, Tensor[] weights, Tensor(a!)[] k_pages, Tensor(b!)[] v_pages, "
        "Tensor slots, Tensor table, Tensor lens, Tensor cos, Tensor sin, float[] eps, "
        "float[] scales, int num_heads, int num_kv_heads, int head_dim, int max_rows, "
        "int bucket_rows) -> Tensor",
        &decode_layers);
}
