// One group's tail of the Iso-Diffusion loss on the CPU (iso_loss_tail.cpp): from its per-sample sums to the
// loss, its parts and the backward coefficients, in float64. Shared with the ensemble's fused training step
// (ensemble_mlp.cpp), whose members' losses must be the loss op's bit for bit.
#pragma once

#include <cstdint>

namespace isofast::cpu::iso_tail {

// Element b of a (B,) tensor of the sums' dtype A, as a double.
template <typename A>
struct Reader {
  const A* p;
  double operator[](int64_t b) const { return static_cast<double>(p[b]); }
};

// One group's rows [b0, b0 + B) of the tail, with its lambda. Per-row outputs (k1, k2, d_w; loss, mse, iso
// for reduction "none") are written at b0 + b; per-group ones (loss, mse, iso, isotropy) at index group.
template <typename A>
struct Out {
  A *loss, *mse, *iso, *isotropy, *k1, *k2, *d_w;
};

template <typename A>
void tail_group(const Reader<A>& se, const Reader<A>& sq, const A* wp, int64_t b0, int64_t B, int64_t group,
                int64_t n, double lambda, bool sample, bool none, bool mean, const Out<A>& out) {
  auto w = [&](int64_t b) { return wp != nullptr ? static_cast<double>(wp[b0 + b]) : 1.0; };
  const double r = mean ? 1.0 / static_cast<double>(B) : 1.0, inv_n = 1.0 / static_cast<double>(n);
  auto mse_b = [&](int64_t b) { return se[b0 + b] * inv_n; };
  auto s_b = [&](int64_t b) { return sq[b0 + b] * inv_n; };
  auto pen_b = [&](int64_t b) { return (s_b(b) - 1.0) * (s_b(b) - 1.0); };
  auto put = [](A* dst, double v) { *dst = static_cast<A>(v); };
  double isotropy = 0;
  for (int64_t b = 0; b < B; ++b) isotropy += s_b(b);
  isotropy /= static_cast<double>(B);

  if (!sample) {
    double m = 0;
    for (int64_t b = 0; b < B; ++b) m += w(b) * mse_b(b);
    m *= r;
    const double pen = (isotropy - 1.0) * (isotropy - 1.0);
    const double slope_s = 2.0 * lambda * (isotropy - 1.0) / static_cast<double>(B);
    put(out.loss + group, m + lambda * pen);
    put(out.mse + group, m);
    put(out.iso + group, pen);
    for (int64_t b = 0; b < B; ++b) {
      put(out.k2 + b0 + b, 2.0 * inv_n * slope_s);
      put(out.d_w + b0 + b, r * mse_b(b));
    }
  } else {
    auto per = [&](int64_t b) { return w(b) * (mse_b(b) + lambda * pen_b(b)); };
    if (none) {
      for (int64_t b = 0; b < B; ++b) {
        put(out.loss + b0 + b, per(b));
        put(out.mse + b0 + b, w(b) * mse_b(b));
        put(out.iso + b0 + b, pen_b(b));
      }
    } else {
      double l = 0, m = 0, p = 0;
      for (int64_t b = 0; b < B; ++b) {
        l += per(b);
        m += w(b) * mse_b(b);
        p += w(b) * pen_b(b);
      }
      put(out.loss + group, r * l);
      put(out.mse + group, r * m);
      put(out.iso + group, r * p);
    }
    for (int64_t b = 0; b < B; ++b) {
      put(out.k2 + b0 + b, 2.0 * inv_n * 2.0 * lambda * r * w(b) * (s_b(b) - 1.0));
      put(out.d_w + b0 + b, r * (mse_b(b) + lambda * pen_b(b)));
    }
  }
  for (int64_t b = 0; b < B; ++b) put(out.k1 + b0 + b, 2.0 * inv_n * r * w(b));
  put(out.isotropy + group, isotropy);
}

}  // namespace isofast::cpu::iso_tail
