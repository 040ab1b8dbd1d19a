// The O(B) tail of the Iso-Diffusion loss on the CPU: from the per-sample sums of iso_sums to
// the loss, its detached parts and the backward coefficients, in one call.
//
// In torch ops this tail is ~20 tiny ops of ~2.5 us each: on the CPU, at training sizes, more
// than the two kernels of the loss together (B=64 x 3072 float32: iso_sums 26 us, iso_grad
// 18 us). The formulas are those of isofast/ops/loss.py (`_slopes`, `reference.loss_from_terms`),
// which the tests hold this op to. Arithmetic in float64; outputs in the dtype of the sums.
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace isofast::cpu {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::vector<double> as_doubles(const at::Tensor& x) {
  const at::Tensor d = x.to(at::kDouble).contiguous();
  const double* p = d.data_ptr<double>();
  return std::vector<double>(p, p + d.numel());
}

at::Tensor filled(const std::vector<double>& v, bool scalar, const at::TensorOptions& opts) {
  at::Tensor d = at::empty(scalar ? at::IntArrayRef{} : at::IntArrayRef{static_cast<int64_t>(v.size())},
                           opts.dtype(at::kDouble));
  std::copy(v.begin(), v.end(), d.data_ptr<double>());
  return d.to(opts.dtype());
}

// Returns (loss, mse, iso, isotropy, k1, k2, d_w):
//   loss, mse, iso: 0-dim, or (B,) for reduction "none" (mode "sample" only); isotropy: 0-dim;
//   k1, k2: the iso_grad coefficients for a unit upstream gradient, (2/n) dL/dmse_b and (2/n) dL/ds_b;
//   d_w: dL/dw_b (the weights' gradient for a unit upstream gradient).
Outputs iso_loss_tail_cpu(const at::Tensor& sse, const at::Tensor& ssq, int64_t n, const std::optional<at::Tensor>& weights,
                          double lambda, std::string_view iso_mode, std::string_view reduction) {
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
  if (weights.has_value()) {
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == B && weights->device() == sse.device(), op,
                ": weights must be a (", B, ",) tensor on ", sse.device(), ", got ", weights->sizes());
  }
  const std::vector<double> se = as_doubles(sse), sq = as_doubles(ssq);
  const std::vector<double> w = weights.has_value() ? as_doubles(*weights) : std::vector<double>(B, 1.0);
  const double r = reduction == "mean" ? 1.0 / static_cast<double>(B) : 1.0;
  const double inv_n = 1.0 / static_cast<double>(n);

  std::vector<double> mse_b(B), s_b(B), k1(B), k2(B), d_w(B);
  double isotropy = 0;
  for (int64_t b = 0; b < B; ++b) {
    mse_b[b] = se[b] * inv_n;
    s_b[b] = sq[b] * inv_n;
    isotropy += s_b[b];
  }
  isotropy /= static_cast<double>(B);

  std::vector<double> loss(1), mse(1, 0.0), iso(1, 0.0);
  if (!sample) {
    for (int64_t b = 0; b < B; ++b) mse[0] += w[b] * mse_b[b];
    mse[0] *= r;
    iso[0] = (isotropy - 1.0) * (isotropy - 1.0);
    loss[0] = mse[0] + lambda * iso[0];
    const double slope_s = 2.0 * lambda * (isotropy - 1.0) / static_cast<double>(B);
    for (int64_t b = 0; b < B; ++b) {
      k1[b] = 2.0 * inv_n * r * w[b];
      k2[b] = 2.0 * inv_n * slope_s;
      d_w[b] = r * mse_b[b];
    }
  } else {
    std::vector<double> per(B), wmse(B), pen(B);
    for (int64_t b = 0; b < B; ++b) {
      pen[b] = (s_b[b] - 1.0) * (s_b[b] - 1.0);
      wmse[b] = w[b] * mse_b[b];
      per[b] = w[b] * (mse_b[b] + lambda * pen[b]);
      k1[b] = 2.0 * inv_n * r * w[b];
      k2[b] = 2.0 * inv_n * 2.0 * lambda * r * w[b] * (s_b[b] - 1.0);
      d_w[b] = r * (mse_b[b] + lambda * pen[b]);
    }
    if (none) {
      loss = per;
      mse = wmse;
      iso = pen;
    } else {
      loss[0] = mse[0] = iso[0] = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        loss[0] += per[b];
        mse[0] += wmse[b];
        iso[0] += w[b] * pen[b];
      }
      loss[0] *= r;
      mse[0] *= r;
      iso[0] *= r;
    }
  }
  const auto opts = sse.options();
  return {filled(loss, !none, opts), filled(mse, !none, opts), filled(iso, !none, opts),
          filled({isotropy}, true, opts), filled(k1, false, opts), filled(k2, false, opts), filled(d_w, false, opts)};
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) { m.impl("iso_loss_tail", &iso_loss_tail_cpu); }

}  // namespace isofast::cpu
