// The O(B) tail of the Iso-Diffusion loss on the CPU: from the per-sample sums of iso_sums to
// the loss, its detached parts and the backward coefficients, in one call.
//
// In torch ops this tail is ~20 tiny ops: on the CPU, at training sizes, they cost more than the
// two kernels of the loss together (benchmarks/results/design-measurements.md). The formulas are
// those of isofast/ops/iso_loss.py (`_LossTail`, `_slopes`, `reference.loss_from_terms`), which the
// tests hold this op to. Arithmetic in float64; outputs in the dtype of the sums. Its autograd is
// in csrc/autograd.cpp.
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace isofast::cpu {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Element b of a (B,) tensor of the sums' dtype A, as a double.
template <typename A>
struct Reader {
  const A* p;
  double operator[](int64_t b) const { return static_cast<double>(p[b]); }
};

// Writes the double values of f(b), b < count, into a new tensor of the sums' dtype (0-dim if scalar).
template <typename A, typename F>
at::Tensor make(int64_t count, bool scalar, const at::TensorOptions& opts, F&& f) {
  at::Tensor out = scalar ? at::empty({}, opts) : at::empty({count}, opts);
  A* o = out.data_ptr<A>();
  for (int64_t b = 0; b < count; ++b) o[b] = static_cast<A>(f(b));
  return out;
}

template <typename A>
Outputs tail(const at::Tensor& sse, const at::Tensor& ssq, int64_t n, const std::optional<at::Tensor>& weights,
             double lambda, bool sample, bool none, bool mean) {
  const int64_t B = sse.size(0);
  const Reader<A> se{sse.data_ptr<A>()}, sq{ssq.data_ptr<A>()};
  const A* wp = weights.has_value() ? weights->data_ptr<A>() : nullptr;
  auto w = [&](int64_t b) { return wp != nullptr ? static_cast<double>(wp[b]) : 1.0; };
  const double r = mean ? 1.0 / static_cast<double>(B) : 1.0, inv_n = 1.0 / static_cast<double>(n);
  auto mse_b = [&](int64_t b) { return se[b] * inv_n; };
  auto s_b = [&](int64_t b) { return sq[b] * inv_n; };
  auto pen_b = [&](int64_t b) { return (s_b(b) - 1.0) * (s_b(b) - 1.0); };
  double isotropy = 0;
  for (int64_t b = 0; b < B; ++b) isotropy += s_b(b);
  isotropy /= static_cast<double>(B);
  const auto opts = sse.options();

  at::Tensor loss, mse, iso, k2, d_w;
  if (!sample) {
    double m = 0;
    for (int64_t b = 0; b < B; ++b) m += w(b) * mse_b(b);
    m *= r;
    const double pen = (isotropy - 1.0) * (isotropy - 1.0);
    const double slope_s = 2.0 * lambda * (isotropy - 1.0) / static_cast<double>(B);
    loss = make<A>(1, true, opts, [&](int64_t) { return m + lambda * pen; });
    mse = make<A>(1, true, opts, [&](int64_t) { return m; });
    iso = make<A>(1, true, opts, [&](int64_t) { return pen; });
    k2 = make<A>(B, false, opts, [&](int64_t) { return 2.0 * inv_n * slope_s; });
    d_w = make<A>(B, false, opts, [&](int64_t b) { return r * mse_b(b); });
  } else {
    auto per = [&](int64_t b) { return w(b) * (mse_b(b) + lambda * pen_b(b)); };
    if (none) {
      loss = make<A>(B, false, opts, per);
      mse = make<A>(B, false, opts, [&](int64_t b) { return w(b) * mse_b(b); });
      iso = make<A>(B, false, opts, pen_b);
    } else {
      double l = 0, m = 0, p = 0;
      for (int64_t b = 0; b < B; ++b) {
        l += per(b);
        m += w(b) * mse_b(b);
        p += w(b) * pen_b(b);
      }
      loss = make<A>(1, true, opts, [&](int64_t) { return r * l; });
      mse = make<A>(1, true, opts, [&](int64_t) { return r * m; });
      iso = make<A>(1, true, opts, [&](int64_t) { return r * p; });
    }
    k2 = make<A>(B, false, opts, [&](int64_t b) { return 2.0 * inv_n * 2.0 * lambda * r * w(b) * (s_b(b) - 1.0); });
    d_w = make<A>(B, false, opts, [&](int64_t b) { return r * (mse_b(b) + lambda * pen_b(b)); });
  }
  at::Tensor k1 = make<A>(B, false, opts, [&](int64_t b) { return 2.0 * inv_n * r * w(b); });
  at::Tensor iso_out = make<A>(1, true, opts, [&](int64_t) { return isotropy; });
  return {loss, mse, iso, iso_out, k1, k2, d_w};
}

// Returns (loss, mse, iso, isotropy, k1, k2, d_w):
//   loss, mse, iso: 0-dim, or (B,) for reduction "none" (mode "sample" only); isotropy: 0-dim;
//   k1, k2: the iso_grad coefficients for a unit upstream gradient, (2/n) dL/dmse_b and (2/n) dL/ds_b;
//   d_w: dL/dw_b (the weights' gradient for a unit upstream gradient).
Outputs iso_loss_tail_cpu(const at::Tensor& sse, const at::Tensor& ssq, int64_t n,
                          const std::optional<at::Tensor>& weights, double lambda, std::string_view iso_mode,
                          std::string_view reduction) {
  constexpr const char* op = "isofast_C::iso_loss_tail";
  TORCH_CHECK(sse.scalar_type() == at::kFloat || sse.scalar_type() == at::kDouble, op,
              ": sse must be float32 or float64, got ", sse.scalar_type());
  TORCH_CHECK(sse.dim() == 1 && sse.size(0) > 0, op, ": sse must be a non-empty 1-D (B,) tensor, got ", sse.sizes());
  TORCH_CHECK(ssq.scalar_type() == sse.scalar_type() && ssq.sizes() == sse.sizes(), op,
              ": ssq must match sse (", sse.scalar_type(), " ", sse.sizes(), "), got ", ssq.scalar_type(), " ",
              ssq.sizes());
  TORCH_CHECK(n > 0, op, ": n must be positive, got ", n);
  TORCH_CHECK(iso_mode == "batch" || iso_mode == "sample", op, ": iso_mode must be 'batch' or 'sample', got '",
              iso_mode, "'");
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", op,
              ": reduction must be 'mean', 'sum' or 'none', got '", reduction, "'");
  const bool sample = iso_mode == "sample", none = reduction == "none";
  TORCH_CHECK(!none || sample, op, ": reduction 'none' needs iso_mode 'sample'");
  const int64_t B = sse.size(0);
  TORCH_CHECK(sse.is_contiguous() && ssq.is_contiguous(), op, ": sse and ssq must be contiguous");
  if (weights.has_value()) {
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == B && weights->device() == sse.device() &&
                    weights->scalar_type() == sse.scalar_type() && weights->is_contiguous(),
                op, ": weights must be a contiguous (", B, ",) tensor of dtype ", sse.scalar_type(), " on ",
                sse.device(), ", got ", weights->scalar_type(), " ", weights->sizes());
  }
  const bool mean = reduction == "mean";
  if (sse.scalar_type() == at::kDouble) return tail<double>(sse, ssq, n, weights, lambda, sample, none, mean);
  return tail<float>(sse, ssq, n, weights, lambda, sample, none, mean);
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) { m.impl("iso_loss_tail", &iso_loss_tail_cpu); }

}  // namespace isofast::cpu
