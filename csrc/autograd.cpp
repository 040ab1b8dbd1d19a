// Autograd of the differentiable isofast_C ops, registered on the ops themselves (as torchvision
// does in csrc/ops/autograd/): one registration for CPU and CUDA tensors alike, and no Python on
// the training step's hot path (a Python autograd kernel costs as much as the loss's kernels at
// training sizes on a CPU: benchmarks/results/design-measurements.md).
//
// The rules (each input's gradient is computed only when autograd asks for it):
//   q_sample:       x_t = sqrt_ab[t] x0 + sqrt_1mab[t] e   ->  dx0 = sqrt_ab[t] g,  de = sqrt_1mab[t] g
//   q_sample_noise: the same for x0; its eps output is the draw, not differentiable
//   iso_sums:       sse = sum (p - e)^2, ssq = sum p^2     ->  dp = iso_grad(p, e, 2 g_sse, 2 g_ssq),
//                                                               de = -2 g_sse (p - e)
//                   with x0, coef (v/x0-prediction): sse = sum r^2, ssq = sum h^2, r = p - (coef0 e + coef1 x0),
//                   h = coef2 p + coef3 e + coef4 x0   ->  dp = iso_grad(..., x0, coef),
//                                                          de = 2 g_sse (-coef0) r + 2 g_ssq coef3 h;
//                   x0 and coef are constants (the ops layer sends a differentiable x0 to the reference)
//   iso_loss_tail:  the loss from the sums                 ->  dsse = k1 g / 2, dssq = k2 g / 2, dw = d_w g
//                   (k1 = (2/n) dL/dmse_b, k2 = (2/n) dL/ds_b, d_w = dL/dw_b are its own outputs; with G groups
//                   g (G,) is each row's group's upstream gradient)
// The sampler steps and the Philox ops have no autograd: isofast.ops sends differentiable step
// inputs to the reference.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace isofast {
namespace {

constexpr const char* kOnceDifferentiable =
    "iso_ddpm_loss: the fused loss is differentiable once (its backward, iso_grad, has no derivative); "
    "for higher-order gradients (create_graph=True) use backend='reference'";

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The op's kernel below autograd (CPU or CUDA by the tensors' device).
template <typename Signature>
c10::TypedOperatorHandle<Signature> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// table[t] (B, 1) times grad, in the table's dtype (float32, float64 for float64 data), back in grad's dtype.
at::Tensor gather_scale(const at::Tensor& table, const at::Tensor& t, const at::Tensor& grad) {
  return (table.index_select(0, t).unsqueeze(1) * grad.to(table.scalar_type())).to(grad.scalar_type());
}

using QSampleSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, int64_t, int64_t);

class QSample : public torch::autograd::Function<QSample> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x0, const at::Tensor& t,
                            const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab,
                            const std::optional<at::Tensor>& e, int64_t seed, int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView below;
    static auto op = kernel<QSampleSig>("isofast_C::q_sample");
    ctx->save_for_backward({t, sqrt_ab, sqrt_1mab});
    ctx->saved_data["has_e"] = e.has_value();
    return op.call(x0, t, sqrt_ab, sqrt_1mab, e, seed, offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &t = saved[0], &sqrt_ab = saved[1], &sqrt_1mab = saved[2];
    const at::Tensor& g = grads[0];
    // Edges are the tensor inputs: x0, t, sqrt_ab, sqrt_1mab, then e when given.
    at::Tensor dx0 = ctx->needs_input_grad(0) ? gather_scale(sqrt_ab, t, g) : at::Tensor();
    at::Tensor de;
    if (ctx->saved_data["has_e"].toBool() && ctx->needs_input_grad(4)) de = gather_scale(sqrt_1mab, t, g);
    return {dx0, at::Tensor(), at::Tensor(), at::Tensor(), de, at::Tensor(), at::Tensor()};
  }
};

using QSampleNoiseSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&, int64_t, int64_t);

class QSampleNoise : public torch::autograd::Function<QSampleNoise> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x0, const at::Tensor& t,
                               const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab, int64_t seed, int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView below;
    static auto op = kernel<QSampleNoiseSig>("isofast_C::q_sample_noise");
    auto [x_t, eps] = op.call(x0, t, sqrt_ab, sqrt_1mab, seed, offset);
    ctx->save_for_backward({t, sqrt_ab});
    ctx->mark_non_differentiable({eps});
    return {x_t, eps};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor dx0 = ctx->needs_input_grad(0) ? gather_scale(saved[1], saved[0], grads[0]) : at::Tensor();
    return {dx0, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

using IsoSumsSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                                                      int64_t, const std::optional<at::Tensor>&,
                                                      const std::optional<at::Tensor>&);
using IsoGradSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&);

std::optional<at::Tensor> optional_of(const at::Tensor& x) {
  return x.defined() ? std::optional<at::Tensor>(x) : std::nullopt;
}

// The gradient in an explicit noise tensor e: -c1 (p - e) (eps-prediction), or with coef (5, B)
// c1 (-coef0) r + c2 coef3 h (the residual r and implied eps h of the header).
at::Tensor noise_grad(const at::Tensor& p, const at::Tensor& e, const at::Tensor& x0, const at::Tensor& coef,
                      const at::Tensor& c1, const at::Tensor& c2) {
  const auto acc = c1.scalar_type();
  const at::Tensor pa = p.to(acc), ea = e.to(acc), k1 = c1.unsqueeze(1);
  if (!coef.defined()) return (-k1 * (pa - ea)).to(e.scalar_type());
  const at::Tensor xa = x0.to(acc), k = coef.unsqueeze(2);  // (5, B, 1): one column per row
  const at::Tensor r = pa - (k[0] * ea + k[1] * xa), h = k[2] * pa + k[3] * ea + k[4] * xa;
  return (-k1 * k[0] * r + c2.unsqueeze(1) * k[3] * h).to(e.scalar_type());
}

class IsoSums : public torch::autograd::Function<IsoSums> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& p, const std::optional<at::Tensor>& e,
                               int64_t seed, int64_t offset, const std::optional<at::Tensor>& x0,
                               const std::optional<at::Tensor>& coef) {
    at::AutoDispatchBelowADInplaceOrView below;
    static auto op = kernel<IsoSumsSig>("isofast_C::iso_sums");
    auto [sse, ssq] = op.call(p, e, seed, offset, x0, coef);
    // e is saved as an undefined tensor when absent: backward regenerates the draw from the key.
    // x0 and coef likewise (eps-prediction). All are references, no copies.
    ctx->save_for_backward({p, e.value_or(at::Tensor()), x0.value_or(at::Tensor()), coef.value_or(at::Tensor())});
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    return {sse, ssq};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto iso_grad = kernel<IsoGradSig>("isofast_C::iso_grad");
    // Grad mode is on in a backward only under create_graph=True (a gradient penalty, a Hessian):
    // iso_grad has no derivative, so refuse rather than drop the second-order term silently.
    TORCH_CHECK(!at::GradMode::is_enabled(), kOnceDifferentiable);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &p = saved[0], &e = saved[1], &x0 = saved[2], &coef = saved[3];
    // Autograd materialises an unused output's gradient as zeros; expanded gradients become dense.
    const at::Tensor c1 = (2 * grads[0]).contiguous(), c2 = (2 * grads[1]).contiguous();
    at::Tensor dp, de;
    if (ctx->needs_input_grad(0)) {
      dp = iso_grad.call(p, optional_of(e), ctx->saved_data["seed"].toInt(), ctx->saved_data["offset"].toInt(), c1,
                         c2, optional_of(x0), optional_of(coef));
    }
    if (e.defined() && ctx->needs_input_grad(1)) de = noise_grad(p, e, x0, coef, c1, c2);
    return {dp, de, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

using TailSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&, double, std::string_view,
    std::string_view, const std::optional<at::Tensor>&);

class IsoLossTail : public torch::autograd::Function<IsoLossTail> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& sse, const at::Tensor& ssq, int64_t n,
                               const std::optional<at::Tensor>& weights, double iso_lambda, std::string_view iso_mode,
                               std::string_view reduction, const std::optional<at::Tensor>& lambdas) {
    at::AutoDispatchBelowADInplaceOrView below;
    static auto op = kernel<TailSig>("isofast_C::iso_loss_tail");
    auto [loss, mse, iso, isotropy, k1, k2, d_w] =
        op.call(sse, ssq, n, weights, iso_lambda, iso_mode, reduction, lambdas);
    ctx->save_for_backward({k1, k2, d_w});
    ctx->saved_data["has_weights"] = weights.has_value();
    ctx->mark_non_differentiable({mse, iso, isotropy, k1, k2, d_w});
    return {loss, mse, iso, isotropy, k1, k2, d_w};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // 0-dim, (B,) for reduction "none", or (G,) with G groups: each row takes its group's
    at::Tensor g = grads[0];
    if (g.dim() == 1 && g.size(0) != saved[0].size(0)) {
      g = g.view({g.size(0), 1}).expand({g.size(0), saved[0].size(0) / g.size(0)}).reshape({-1});
    }
    // Halved: mse_b = sse_b / n, and k1, k2 carry the factor 2/n of d(sse)/dp, d(ssq)/dp.
    at::Tensor dsse = ctx->needs_input_grad(0) ? saved[0] * 0.5 * g : at::Tensor();
    at::Tensor dssq = ctx->needs_input_grad(1) ? saved[1] * 0.5 * g : at::Tensor();
    at::Tensor dw;
    if (ctx->saved_data["has_weights"].toBool() && ctx->needs_input_grad(2)) dw = saved[2] * g;
    return {dsse, dssq, at::Tensor(), dw, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor q_sample_autograd(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                             const at::Tensor& sqrt_1mab, const std::optional<at::Tensor>& e, int64_t seed,
                             int64_t offset) {
  return QSample::apply(x0, t, sqrt_ab, sqrt_1mab, e, seed, offset);
}

std::tuple<at::Tensor, at::Tensor> q_sample_noise_autograd(const at::Tensor& x0, const at::Tensor& t,
                                                           const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab,
                                                           int64_t seed, int64_t offset) {
  auto out = QSampleNoise::apply(x0, t, sqrt_ab, sqrt_1mab, seed, offset);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> iso_sums_autograd(const at::Tensor& p, const std::optional<at::Tensor>& e,
                                                     int64_t seed, int64_t offset, const std::optional<at::Tensor>& x0,
                                                     const std::optional<at::Tensor>& coef) {
  // No rule for them: refuse rather than return a gradient that silently leaves them out.
  TORCH_CHECK(!at::GradMode::is_enabled() || !((x0 && x0->requires_grad()) || (coef && coef->requires_grad())),
              "isofast_C::iso_sums: x0 and coef are constants (no gradient flows into them); "
              "iso_ddpm_loss sends an x0 that requires grad to the reference");
  auto out = IsoSums::apply(p, e, seed, offset, x0, coef);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> iso_loss_tail_autograd(
    const at::Tensor& sse, const at::Tensor& ssq, int64_t n, const std::optional<at::Tensor>& weights,
    double iso_lambda, std::string_view iso_mode, std::string_view reduction, const std::optional<at::Tensor>& lambdas) {
  auto out = IsoLossTail::apply(sse, ssq, n, weights, iso_lambda, iso_mode, reduction, lambdas);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, Autograd, m) {
  m.impl("q_sample", &q_sample_autograd);
  m.impl("q_sample_noise", &q_sample_noise_autograd);
  m.impl("iso_sums", &iso_sums_autograd);
  m.impl("iso_loss_tail", &iso_loss_tail_autograd);
}

}  // namespace isofast
