// The per-row arithmetic of the Iso-Diffusion loss's CPU kernels (iso_loss.cpp), shared with the ensemble's
// fused training step (ensemble_mlp.cpp), which must compute a member's loss and gradient bit for bit as the
// loss op does: one definition, compiled alike (baseline x86-64, no fused multiply-add) in both.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace isofast::cpu::iso_rows {

// sum_j (p - eps)^2 and sum_j p^2 over [j0, j1) with kLanes independent running sums (element j
// goes to lane (j - j0) % kLanes), added in a fixed order at the end. The lanes are a GCC/Clang
// vector type: the auto-vectoriser leaves a 16-array lane loop scalar (-fopt-info-vec), which made
// this 4x slower than iso_grad. Nothing is reassociated, so the result does not depend on pointer
// alignment, ISA or whether eps is regenerated or read back: bit-identical either way.
constexpr int kLanes = 16;

// The lane vectors only live inside inlined code, so the ABI note GCC gives for passing 64-byte
// vectors between functions compiled for different ISAs does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename A>
struct Lanes {
  typedef A type __attribute__((vector_size(kLanes * sizeof(A))));
};
template <typename A>
using lanes_t = typename Lanes<A>::type;

// kLanes consecutive elements of x as arithmetic-type lanes (unaligned load, exact conversion).
template <typename A, typename X>
[[gnu::always_inline]] inline lanes_t<A> load_lanes(const X* __restrict__ x) {
  if constexpr (std::is_same_v<A, X>) {
    lanes_t<A> v;
    std::memcpy(&v, x, sizeof v);
    return v;
  } else if constexpr (std::is_same_v<X, float>) {  // float normals into float64 lanes
    lanes_t<float> f;
    std::memcpy(&f, x, sizeof f);
    return __builtin_convertvector(f, lanes_t<A>);
  } else {  // bfloat16 / float16
    lanes_t<A> v;
    for (int l = 0; l < kLanes; ++l) v[l] = static_cast<A>(x[l]);
    return v;
  }
}

// The per-element terms of eps-prediction: residual r = p - eps, implied eps h = p (x0 unused).
struct EpsilonTerms {
  static constexpr bool kReadsX0 = false;
  template <typename V>
  [[gnu::always_inline]] void operator()(const V& p, const V& eps, const V& /*x0*/, V& r, V& h) const {
    r = p - eps;
    h = p;
  }
  template <typename A>
  [[gnu::always_inline]] A hat_p() const { return A(1); }
};

// The per-element terms of one row of v- or x0-prediction, from its coef column:
// r = p - (tgt_eps eps + tgt_x0 x0), h = hat_p p + hat_eps eps + hat_x0 x0.
template <typename A>
struct AffineTerms {
  static constexpr bool kReadsX0 = true;
  A tgt_eps, tgt_x0, hat_p_, hat_eps, hat_x0;
  template <typename V>
  [[gnu::always_inline]] void operator()(const V& p, const V& eps, const V& x0, V& r, V& h) const {
    r = p - (tgt_eps * eps + tgt_x0 * x0);
    h = hat_p_ * p + hat_eps * eps + hat_x0 * x0;
  }
  template <typename R>
  [[gnu::always_inline]] R hat_p() const { return hat_p_; }
};

// Row b's AffineTerms from coef (5, B), rows (tgt_eps, tgt_x0, hat_p, hat_eps, hat_x0).
template <typename A>
struct AffineRows {
  const A* coef;
  int64_t B;
  AffineTerms<A> operator()(int64_t b) const {
    return {coef[b], coef[B + b], coef[2 * B + b], coef[3 * B + b], coef[4 * B + b]};
  }
};

template <typename A, typename P, typename E, typename Terms>
inline void row_sums(const P* __restrict__ p, const E* __restrict__ eps, const P* __restrict__ x0, int64_t len,
                     const Terms& terms, A* s_err, A* s_sq) {
  lanes_t<A> se_v = {}, sq_v = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    const lanes_t<A> pv = load_lanes<A>(p + j);
    lanes_t<A> xv = {}, d, h;
    if constexpr (Terms::kReadsX0) xv = load_lanes<A>(x0 + j);
    terms(pv, load_lanes<A>(eps + j), xv, d, h);
    se_v += d * d;
    sq_v += h * h;
  }
  A se[kLanes], sq[kLanes];
  std::memcpy(se, &se_v, sizeof se);
  std::memcpy(sq, &sq_v, sizeof sq);
  for (int l = 0; j < len; ++j, ++l) {
    const A xv = Terms::kReadsX0 ? static_cast<A>(x0[j]) : A(0);
    A d, h;
    terms(static_cast<A>(p[j]), static_cast<A>(eps[j]), xv, d, h);
    se[l] += d * d;
    sq[l] += h * h;
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {  // pairwise, fixed order
    for (int l = 0; l < w; ++l) {
      se[l] += se[l + w];
      sq[l] += sq[l + w];
    }
  }
  *s_err = se[0];
  *s_sq = sq[0];
}

// g = k1 r + k2 hat_p h over one tile of a row (eps: any contiguous float or data-type pointer).
template <typename A, typename T, typename E, typename Terms>
[[gnu::always_inline]] inline void grad_tile(const T* __restrict__ pr, const E* __restrict__ er,
                                             const T* __restrict__ xr, T* __restrict__ gr, int64_t len, A k1, A k2,
                                             const Terms& terms) {
  const A k2h = k2 * terms.template hat_p<A>();
  for (int64_t j = 0; j < len; ++j) {
    const A xv = Terms::kReadsX0 ? static_cast<A>(xr[j]) : A(0);
    A r, h;
    terms(static_cast<A>(pr[j]), static_cast<A>(er[j]), xv, r, h);
    gr[j] = static_cast<T>(k1 * r + k2h * h);
  }
}

}  // namespace isofast::cpu::iso_rows
