// The per-sample coefficients of the sampler steps, shared by the CPU and CUDA kernels (host and device).
//
//   x0 = a x - b eps  (clamped to [-1, 1] if clip_x0);   x_prev = c x0 + m y + s z,
//   with y = x for DDPM (m = posterior_mean_coef2) and y = eps for DDIM (m = sqrt(1 - ab_prev - sigma^2)).
// Each step keeps only the terms of its formula: a term with a zero coefficient would turn an
// infinite x or eps into 0 * inf = NaN where the reference (and Triton) keep the infinity.
#pragma once

#include <cstdint>

#include "philox.h"  // ISOFAST_HD

namespace isofast {

template <typename A>
struct StepCoef {
  A a, b, c, m, s;
};

template <typename A>
ISOFAST_HD A step_sqrt(A v) {
#if defined(__CUDACC__) || defined(__HIPCC__)
  return sqrt(v);
#else
  return std::sqrt(v);
#endif
}

// DDPM, from the rows of the (5, T) table: sqrt_recip_ab, sqrt_recipm1_ab, posterior_mean_coef1,
// posterior_mean_coef2, sigma (no noise at t = 0).
template <typename A>
ISOFAST_HD StepCoef<A> ddpm_coef(const A* tab, int64_t T, int64_t t) {
  return {tab[t], tab[T + t], tab[2 * T + t], tab[3 * T + t], t > 0 ? tab[4 * T + t] : A(0)};
}

// DDIM rows of the (6, T) table, each rounded once from the schedule's float64 masters, so that no
// coefficient is rebuilt from a rounded ab (1 - ab near t = 0 loses ~3 digits in float32):
constexpr int64_t kDdimRows = 6;  // 1/sqrt(ab), sqrt(1/ab - 1), sqrt(ab), sqrt(1 - ab), ab, 1 - ab
// t_prev = -1 is the jump to x_0 (ab_prev = 1). sigma = eta sqrt((1 - ab_prev)/(1 - ab) (1 - ab/ab_prev)).
template <typename A>
ISOFAST_HD StepCoef<A> ddim_coef(const A* tab, int64_t T, int64_t t, int64_t t_prev, A eta) {
  const bool last = t_prev < 0;
  const A one(1), zero(0);
  const A c = last ? one : tab[2 * T + t_prev];
  if (eta == zero) return {tab[t], tab[T + t], c, last ? zero : tab[3 * T + t_prev], zero};
  const A ab = tab[4 * T + t], om = tab[5 * T + t];
  const A ab_prev = last ? one : tab[4 * T + t_prev], om_prev = last ? zero : tab[5 * T + t_prev];
  // ab_prev - ab from the smaller pair (ab's below 1/2, else the 1 - ab's): its rounding errors are the smaller.
  const A gap = ab_prev <= A(0.5) ? ab_prev - ab : om - om_prev;
  const A sigma = eta * step_sqrt(om_prev / om * (gap / ab_prev));
  const A rest = om_prev - sigma * sigma;
  return {tab[t], tab[T + t], c, step_sqrt(rest > zero ? rest : zero), sigma};
}

}  // namespace isofast
