// One sampler step on the CPU, one pass over x and eps_pred, fresh noise z generated per tile from
// the key tensor (seed, offset) unless given. Rows whose noise coefficient is zero (t = 0 for
// DDPM, sigma = 0 for DDIM) skip the generation: 0 * z adds nothing.
//   ddpm: x0 = tab[0,t] x - tab[1,t] eps; [clip]; x_prev = tab[2,t] x0 + tab[3,t] x + [t>0] tab[4,t] z
//   ddim: x0 = (x - sqrt(1-ab) eps) / sqrt(ab); [clip]; x_prev = sqrt(ab_prev) x0 + c_eps eps + sigma z
// Vectorisation (g++ 12 -fopt-info-vec): the inner loops vectorise (SSE2 baseline) for float32,
// float64 and bfloat16; float16 stays scalar (its conversion is a branchy routine without F16C).
#include "cpu_common.h"
#include "../checks.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

namespace isofast::cpu {
namespace {

// Per-row coefficients: x0 = a x - b eps; x_prev = c x0 + d x + f eps + s z.
template <typename A>
struct RowCoef {
  A a, b, c, d, f, s;
};

template <typename T>
void step_kernel(const T* x, const T* ep, const RowCoef<acc_t<T>>* coef, const T* e, uint64_t seed, uint64_t offset,
                 bool clip, T* out, int64_t B, int64_t n) {
  using A = acc_t<T>;
  for_each_tile(B, n, seed, offset, [&](int64_t b) { return e == nullptr && coef[b].s != A(0); },
                [&](int64_t b, int64_t j0, int64_t j1, const float* z) {
                  const RowCoef<A> k = coef[b];
                  const T* xr = x + b * n;
                  const T* er = ep + b * n;
                  T* o = out + b * n;
                  const T* nz = e != nullptr ? e + b * n : nullptr;
                  if (z != nullptr) z -= j0;
                  // One loop per noise source keeps each branch-free so that it vectorises.
                  auto x0_of = [&](A xv, A ev) {
                    const A v = k.a * xv - k.b * ev;
                    return clip ? std::min(std::max(v, A(-1)), A(1)) : v;
                  };
                  if (z != nullptr) {
                    for (int64_t j = j0; j < j1; ++j) {
                      const A xv = static_cast<A>(xr[j]), ev = static_cast<A>(er[j]);
                      o[j] = static_cast<T>(k.c * x0_of(xv, ev) + k.d * xv + k.f * ev + k.s * static_cast<A>(z[j]));
                    }
                  } else if (nz != nullptr) {
                    for (int64_t j = j0; j < j1; ++j) {
                      const A xv = static_cast<A>(xr[j]), ev = static_cast<A>(er[j]);
                      o[j] = static_cast<T>(k.c * x0_of(xv, ev) + k.d * xv + k.f * ev + k.s * static_cast<A>(nz[j]));
                    }
                  } else {
                    for (int64_t j = j0; j < j1; ++j) {
                      const A xv = static_cast<A>(xr[j]), ev = static_cast<A>(er[j]);
                      o[j] = static_cast<T>(k.c * x0_of(xv, ev) + k.d * xv + k.f * ev);
                    }
                  }
                });
}

// The step with the coefficients coef[b] = row(b, table data) of every sample b, in the table's
// dtype A (float64 for float64 data, float32 otherwise: check_table).
template <typename Row>
at::Tensor run_step(const at::Tensor& x, const at::Tensor& eps_pred, const at::Tensor& table, Row&& row,
                    const std::optional<at::Tensor>& e, const std::optional<at::Tensor>& key, bool clip_x0) {
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  // The key is read only when the noise is generated (e is None; checked to be present then).
  const int64_t zero_key[2] = {0, 0};
  const int64_t* k = key.has_value() ? key->data_ptr<int64_t>() : zero_key;
  const int64_t B = x.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "isofast_step_cpu", [&] {
    using A = acc_t<scalar_t>;
    const A* tab = table.data_ptr<A>();
    std::vector<RowCoef<A>> coef(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) coef[b] = row(b, tab);
    step_kernel<scalar_t>(x.data_ptr<scalar_t>(), eps_pred.data_ptr<scalar_t>(), coef.data(),
                          e.has_value() ? e->data_ptr<scalar_t>() : nullptr, static_cast<uint64_t>(k[0]),
                          static_cast<uint64_t>(k[1]), clip_x0, out.data_ptr<scalar_t>(), B, x.size(1));
  });
  return out;
}

// The arithmetic type A of a coefficient table pointer const A*.
template <typename P>
using table_t = std::remove_const_t<std::remove_pointer_t<P>>;

at::Tensor ddpm_step_cpu(const at::Tensor& x, const at::Tensor& eps_pred, const at::Tensor& t, const at::Tensor& table,
                         const std::optional<at::Tensor>& e, const std::optional<at::Tensor>& key, bool clip_x0) {
  constexpr const char* op = "isofast_C::ddpm_step";
  check_ddpm_step_args(x, eps_pred, t, table, e, key, op);
  const int64_t T = table.size(1);
  const int64_t* tt = t.data_ptr<int64_t>();
  check_steps(tt, x.size(0), T, false, op, "t");
  auto row = [&](int64_t b, const auto* tab) {
    using A = table_t<decltype(tab)>;
    const int64_t s = tt[b];
    return RowCoef<A>{tab[s], tab[T + s], tab[2 * T + s], tab[3 * T + s], A(0), s > 0 ? tab[4 * T + s] : A(0)};
  };
  return run_step(x, eps_pred, table, row, e, key, clip_x0);
}

at::Tensor ddim_step_cpu(const at::Tensor& x, const at::Tensor& eps_pred, const at::Tensor& t, const at::Tensor& t_prev,
                         const at::Tensor& alphas_cumprod, double eta, const std::optional<at::Tensor>& e,
                         const std::optional<at::Tensor>& key, bool clip_x0) {
  constexpr const char* op = "isofast_C::ddim_step";
  check_ddim_step_args(x, eps_pred, t, t_prev, alphas_cumprod, e, key, op);
  const int64_t B = x.size(0), T = alphas_cumprod.numel();
  const int64_t *tt = t.data_ptr<int64_t>(), *tp = t_prev.data_ptr<int64_t>();
  check_steps(tt, B, T, false, op, "t");
  check_steps(tp, B, T, true, op, "t_prev");
  auto row = [&](int64_t b, const auto* acp) {
    using A = table_t<decltype(acp)>;
    const A one(1), zero(0), et = static_cast<A>(eta);
    const A ab = acp[tt[b]], ab_prev = tp[b] >= 0 ? acp[tp[b]] : one;
    const A sigma = et * std::sqrt((one - ab_prev) / (one - ab) * (one - ab / ab_prev));
    const A c_eps = std::sqrt(std::max(one - ab_prev - sigma * sigma, zero));
    const A inv = one / std::sqrt(ab);
    return RowCoef<A>{inv, std::sqrt(one - ab) * inv, std::sqrt(ab_prev), zero, c_eps, sigma};
  };
  return run_step(x, eps_pred, alphas_cumprod, row, e, key, clip_x0);
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) {
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("ddim_step", &ddim_step_cpu);
}

}  // namespace isofast::cpu
