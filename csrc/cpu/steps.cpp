// One sampler step on the CPU, one pass over x and eps_pred, fresh noise z generated per tile from
// the key tensor (seed, offset) unless given. Rows whose noise coefficient is zero (t = 0 for
// DDPM, sigma = 0 for DDIM) skip the generation: 0 * z adds nothing.
// The coefficients and the formula: step_coefficients.h.
// Vectorisation (g++ 12 -fopt-info-vec): the inner loops vectorise (SSE2 baseline) for float32,
// float64 and bfloat16; float16 stays scalar (its conversion is a branchy routine without F16C).
#include "cpu_common.h"
#include "../checks.h"
#include "../step_coefficients.h"

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

// x_prev of every element; kDdim: the third term is m * eps (DDIM), else m * x (DDPM).
template <bool kDdim, typename T>
void step_kernel(const T* x, const T* ep, const StepCoef<acc_t<T>>* coef, const T* e, uint64_t seed, uint64_t offset,
                 bool clip, T* out, int64_t B, int64_t n) {
  using A = acc_t<T>;
  for_each_tile(B, n, seed, offset, [&](int64_t b) { return e == nullptr && coef[b].s != A(0); },
                [&](int64_t b, int64_t j0, int64_t j1, const float* z) {
                  const StepCoef<A> k = coef[b];
                  const T* xr = x + b * n;
                  const T* er = ep + b * n;
                  T* o = out + b * n;
                  const T* nz = e != nullptr ? e + b * n : nullptr;
                  if (z != nullptr) z -= j0;
                  // One loop per noise source keeps each branch-free so that it vectorises.
                  auto mean = [&](A xv, A ev) {
                    A x0 = k.a * xv - k.b * ev;
                    if (clip) x0 = std::min(std::max(x0, A(-1)), A(1));
                    if constexpr (kDdim) {
                      return k.c * x0 + k.m * ev;
                    } else {
                      return k.c * x0 + k.m * xv;
                    }
                  };
                  if (z != nullptr) {
                    for (int64_t j = j0; j < j1; ++j) {
                      const A xv = static_cast<A>(xr[j]), ev = static_cast<A>(er[j]);
                      o[j] = static_cast<T>(mean(xv, ev) + k.s * static_cast<A>(z[j]));
                    }
                  } else if (nz != nullptr) {
                    for (int64_t j = j0; j < j1; ++j) {
                      const A xv = static_cast<A>(xr[j]), ev = static_cast<A>(er[j]);
                      o[j] = static_cast<T>(mean(xv, ev) + k.s * static_cast<A>(nz[j]));
                    }
                  } else {
                    for (int64_t j = j0; j < j1; ++j) {
                      o[j] = static_cast<T>(mean(static_cast<A>(xr[j]), static_cast<A>(er[j])));
                    }
                  }
                });
}

// The step with the coefficients coef[b] = row(b, table data) of every sample b, in the table's
// dtype A (float64 for float64 data, float32 otherwise: check_table).
template <bool kDdim, typename Row>
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
    std::vector<StepCoef<A>> coef(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) coef[b] = row(b, tab);
    step_kernel<kDdim, scalar_t>(x.data_ptr<scalar_t>(), eps_pred.data_ptr<scalar_t>(), coef.data(),
                                 e.has_value() ? e->data_ptr<scalar_t>() : nullptr, static_cast<uint64_t>(k[0]),
                                 static_cast<uint64_t>(k[1]), clip_x0, out.data_ptr<scalar_t>(), B, x.size(1));
  });
  return out;
}

at::Tensor ddpm_step_cpu(const at::Tensor& x, const at::Tensor& eps_pred, const at::Tensor& t, const at::Tensor& table,
                         const std::optional<at::Tensor>& e, const std::optional<at::Tensor>& key, bool clip_x0) {
  constexpr const char* op = "isofast_C::ddpm_step";
  check_ddpm_step_args(x, eps_pred, t, table, e, key, op);
  const int64_t T = table.size(1);
  const int64_t* tt = t.data_ptr<int64_t>();
  check_steps(tt, x.size(0), T, false, op, "t");
  auto row = [&](int64_t b, const auto* tab) { return ddpm_coef(tab, T, tt[b]); };
  return run_step<false>(x, eps_pred, table, row, e, key, clip_x0);
}

at::Tensor ddim_step_cpu(const at::Tensor& x, const at::Tensor& eps_pred, const at::Tensor& t, const at::Tensor& t_prev,
                         const at::Tensor& table, double eta, const std::optional<at::Tensor>& e,
                         const std::optional<at::Tensor>& key, bool clip_x0) {
  constexpr const char* op = "isofast_C::ddim_step";
  check_ddim_step_args(x, eps_pred, t, t_prev, table, e, key, op);
  const int64_t B = x.size(0), T = table.size(1);
  const int64_t *tt = t.data_ptr<int64_t>(), *tp = t_prev.data_ptr<int64_t>();
  check_steps(tt, B, T, false, op, "t");
  check_steps(tp, B, T, true, op, "t_prev");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(tp[b] < tt[b], op, ": t_prev[", b, "] = ", tp[b], " must be < t[", b, "] = ", tt[b],
                " (a DDIM step goes back in time; t_prev = -1 jumps to x_0)");
  }
  auto row = [&](int64_t b, const auto* tab) {
    using A = std::remove_const_t<std::remove_pointer_t<decltype(tab)>>;
    return ddim_coef(tab, T, tt[b], tp[b], static_cast<A>(eta));
  };
  return run_step<true>(x, eps_pred, table, row, e, key, clip_x0);
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) {
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("ddim_step", &ddim_step_cpu);
}

}  // namespace isofast::cpu
