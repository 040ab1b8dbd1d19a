// The O(B) tail of the Iso-Diffusion loss on the CPU: from the per-sample sums of iso_sums to
// the loss, its detached parts and the backward coefficients, in one call.
//
// In torch ops this tail is ~20 tiny ops: on the CPU, at training sizes, they cost more than the
// two kernels of the loss together (benchmarks/results/design-measurements.md). The formulas are
// those of isofast/ops/iso_loss.py (`_LossTail`, `_slopes`, `reference.loss_from_terms`), which the
// tests hold this op to. Arithmetic in float64; outputs in the dtype of the sums. Its autograd is
// in csrc/autograd.cpp.
#include "iso_tail.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace isofast::cpu {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using namespace iso_tail;

// lambdas: one value per group (nullptr: one group, lambda).
template <typename A>
Outputs tail(const at::Tensor& sse, const at::Tensor& ssq, int64_t n, const std::optional<at::Tensor>& weights,
             double lambda, const double* lambdas, int64_t groups, bool sample, bool none, bool mean) {
  const int64_t B = sse.size(0), per_group = B / groups;
  const auto opts = sse.options();
  // one group without a lambdas tensor: 0-dim results (reduction "none": (B,)); else one per group
  auto sized = [&](bool per_row) {
    if (per_row) return at::empty({B}, opts);
    return lambdas == nullptr ? at::empty({}, opts) : at::empty({groups}, opts);
  };
  at::Tensor loss = sized(none), mse = sized(none), iso = sized(none), isotropy = sized(false);
  at::Tensor k1 = at::empty({B}, opts), k2 = at::empty({B}, opts), d_w = at::empty({B}, opts);
  const Out<A> out{loss.data_ptr<A>(), mse.data_ptr<A>(), iso.data_ptr<A>(), isotropy.data_ptr<A>(),
                   k1.data_ptr<A>(), k2.data_ptr<A>(), d_w.data_ptr<A>()};
  const Reader<A> se{sse.data_ptr<A>()}, sq{ssq.data_ptr<A>()};
  const A* wp = weights.has_value() ? weights->data_ptr<A>() : nullptr;
  for (int64_t g = 0; g < groups; ++g) {
    tail_group<A>(se, sq, wp, g * per_group, per_group, g, n, lambdas == nullptr ? lambda : lambdas[g], sample, none,
                  mean, out);
  }
  return {loss, mse, iso, isotropy, k1, k2, d_w};
}

// Returns (loss, mse, iso, isotropy, k1, k2, d_w):
//   loss, mse, iso: 0-dim, or (B,) for reduction "none" (mode "sample" only); isotropy: 0-dim;
//   with lambdas (G,): the B sums are G consecutive groups of B/G (an ensemble's members), group g with the
//   penalty weight lambdas[g] (iso_lambda unused), and loss, mse, iso, isotropy are (G,) (reduction "none": (B,));
//   k1, k2: the iso_grad coefficients for a unit upstream gradient, (2/n) dL/dmse_b and (2/n) dL/ds_b;
//   d_w: dL/dw_b (the weights' gradient for a unit upstream gradient).
Outputs iso_loss_tail_cpu(const at::Tensor& sse, const at::Tensor& ssq, int64_t n,
                          const std::optional<at::Tensor>& weights, double lambda, std::string_view iso_mode,
                          std::string_view reduction, const std::optional<at::Tensor>& lambdas) {
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
  at::Tensor lam;  // float64: a float32 lambda converts exactly, as the torch-ops tail's .to(float64)
  if (lambdas.has_value()) {
    TORCH_CHECK(lambdas->dim() == 1 && lambdas->size(0) > 0 && B % lambdas->size(0) == 0 &&
                    lambdas->device() == sse.device() && lambdas->is_floating_point(),
                op, ": lambdas must be a float (G,) tensor on ", sse.device(), " with G dividing the ", B,
                " sums (one penalty weight per group), got ", lambdas->scalar_type(), " ", lambdas->sizes(), " on ",
                lambdas->device());
    lam = lambdas->to(at::kDouble).contiguous();
  }
  const double* lp = lam.defined() ? lam.data_ptr<double>() : nullptr;
  const int64_t groups = lam.defined() ? lam.size(0) : 1;
  const bool mean = reduction == "mean";
  if (sse.scalar_type() == at::kDouble) return tail<double>(sse, ssq, n, weights, lambda, lp, groups, sample, none, mean);
  return tail<float>(sse, ssq, n, weights, lambda, lp, groups, sample, none, mean);
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) { m.impl("iso_loss_tail", &iso_loss_tail_cpu); }

}  // namespace isofast::cpu
