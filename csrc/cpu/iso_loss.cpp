// The Iso-Diffusion loss on the CPU, as two one-pass kernels that regenerate eps per tile (or read
// it: the data's dtype, or float32 beside 16-bit data when it is the backend's stored draw):
//   iso_sums: sse[b] = sum_j r[b,j]^2,  ssq[b] = sum_j h[b,j]^2                 (float32 / float64 (B,))
//   iso_grad: g[b,j] = c1[b] r[b,j] + c2[b] coef[2,b] h[b,j]                     (data dtype)
// with, for eps-prediction (no coef, no x0): r = p - eps, h = p (and coef[2] = 1); for v- or
// x0-prediction (coef (5, B), x0 (B, n)): r = p - (coef[0] eps + coef[1] x0), the residual against
// the target, and h = coef[2] p + coef[3] eps + coef[4] x0, the implied eps. The eps path is its own
// instantiation (EpsilonTerms): it reads no x0 and does the arithmetic it did before coef existed.
// Sums are accumulated per tile in the arithmetic type in 16 fixed lanes (vectorised), then the
// tile partials of a row are added in float64 in a fixed order: the result does not depend on the
// number of threads, the ISA, or whether eps was regenerated or stored.
// Vectorisation (g++ 12 -fopt-info-vec): the lane sums are written with GCC vector types, because
// the auto-vectoriser left the 16-lane loop scalar (iso_sums then ran at a quarter of iso_grad's
// speed); the gradient loops vectorise (SSE2 baseline) for float32 and float64; the 16-bit
// conversions keep some of the bfloat16/float16 loops scalar.
#include "cpu_common.h"
#include "../checks.h"
#include "../row_partials.h"
#include "iso_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace isofast::cpu {
namespace {

using namespace iso_rows;

// row_terms(b): the Terms of row b (EpsilonTerms, or AffineTerms from AffineRows).
template <typename T, typename E, typename RowTerms>
void iso_sums_kernel(const T* p, const E* e, const T* x0, RowTerms row_terms, uint64_t seed, uint64_t offset,
                     acc_t<T>* sse, acc_t<T>* ssq, int64_t B, int64_t n) {
  using A = acc_t<T>;
  const int64_t tiles_per_row = (n + kTile - 1) / kTile;
  std::vector<double> part(static_cast<size_t>(2 * B * tiles_per_row));
  for_each_tile(B, n, seed, offset, [&](int64_t) { return e == nullptr; },
                [&](int64_t b, int64_t j0, int64_t j1, const float* z) {
                  A s_err, s_sq;
                  const auto terms = row_terms(b);
                  const T* xr = x0 == nullptr ? nullptr : x0 + b * n + j0;
                  if (z != nullptr) {
                    row_sums<A>(p + b * n + j0, z, xr, j1 - j0, terms, &s_err, &s_sq);
                  } else {
                    row_sums<A>(p + b * n + j0, e + b * n + j0, xr, j1 - j0, terms, &s_err, &s_sq);
                  }
                  const int64_t slot = b * tiles_per_row + j0 / kTile;
                  part[2 * slot] = s_err;
                  part[2 * slot + 1] = s_sq;
                });
  for (int64_t b = 0; b < B; ++b) add_row_partials(part.data(), b, tiles_per_row, sse, ssq);
}

template <typename T, typename E, typename RowTerms>
void iso_grad_kernel(const T* p, const E* e, const T* x0, RowTerms row_terms, uint64_t seed, uint64_t offset,
                     const acc_t<T>* c1, const acc_t<T>* c2, T* g, int64_t B, int64_t n) {
  using A = acc_t<T>;
  for_each_tile(B, n, seed, offset, [&](int64_t) { return e == nullptr; },
                [&](int64_t b, int64_t j0, int64_t j1, const float* z) {
                  const auto terms = row_terms(b);
                  const int64_t at = b * n + j0;
                  const T* xr = x0 == nullptr ? nullptr : x0 + at;
                  if (z != nullptr) {
                    grad_tile<A>(p + at, z, xr, g + at, j1 - j0, c1[b], c2[b], terms);
                  } else {
                    grad_tile<A>(p + at, e + at, xr, g + at, j1 - j0, c1[b], c2[b], terms);
                  }
                });
}

// Calls kernel(x0_data, row_terms) for eps-prediction (no coef: nullptr, EpsilonTerms) or the
// affine terms of coef (5, B) over x0 (v- and x0-prediction).
template <typename T, typename Kernel>
void with_terms(const std::optional<at::Tensor>& x0, const std::optional<at::Tensor>& coef, int64_t B,
                Kernel&& kernel) {
  using A = acc_t<T>;
  if (!coef.has_value()) {
    kernel(static_cast<const T*>(nullptr), [](int64_t) { return EpsilonTerms{}; });
  } else {
    kernel(static_cast<const T*>(x0->data_ptr<T>()), AffineRows<A>{coef->data_ptr<A>(), B});
  }
}

// Calls kernel(noise) with the noise as the kernels read it: nullptr (generate), the data's dtype
// (explicit noise), or float32 beside 16-bit data (the backend's stored draw).
template <typename T, typename Kernel>
void with_noise(const std::optional<at::Tensor>& e, const at::Tensor& p, Kernel&& kernel) {
  if (!e.has_value()) {
    kernel(static_cast<const T*>(nullptr));
  } else if (is_float32_noise_for(*e, p)) {
    kernel(static_cast<const float*>(e->data_ptr<float>()));
  } else {
    kernel(static_cast<const T*>(e->data_ptr<T>()));
  }
}

std::tuple<at::Tensor, at::Tensor> iso_sums_cpu(const at::Tensor& p, const std::optional<at::Tensor>& e, int64_t seed,
                                                int64_t offset, const std::optional<at::Tensor>& x0,
                                                const std::optional<at::Tensor>& coef) {
  constexpr const char* op = "isofast_C::iso_sums";
  check_iso_sums_args(p, e, x0, coef, op, /*float32_noise_ok=*/true);
  const int64_t B = p.size(0), n = p.size(1);
  const auto acc = table_dtype(p.scalar_type());
  at::Tensor sse = at::empty({B}, p.options().dtype(acc)), ssq = at::empty({B}, p.options().dtype(acc));
  if (n == 0) {
    sse.zero_();
    ssq.zero_();
    return {sse, ssq};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "isofast_iso_sums_cpu", [&] {
    using A = acc_t<scalar_t>;
    with_noise<scalar_t>(e, p, [&](const auto* noise) {
      with_terms<scalar_t>(x0, coef, B, [&](const scalar_t* x0p, auto row_terms) {
        iso_sums_kernel<scalar_t>(p.data_ptr<scalar_t>(), noise, x0p, row_terms, static_cast<uint64_t>(seed),
                                  static_cast<uint64_t>(offset), sse.data_ptr<A>(), ssq.data_ptr<A>(), B, n);
      });
    });
  });
  return {sse, ssq};
}

at::Tensor iso_grad_cpu(const at::Tensor& p, const std::optional<at::Tensor>& e, int64_t seed, int64_t offset,
                        const at::Tensor& c1, const at::Tensor& c2, const std::optional<at::Tensor>& x0,
                        const std::optional<at::Tensor>& coef) {
  constexpr const char* op = "isofast_C::iso_grad";
  check_iso_grad_args(p, e, c1, c2, x0, coef, op, /*float32_noise_ok=*/true);
  at::Tensor g = at::empty_like(p);
  if (p.numel() == 0) return g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "isofast_iso_grad_cpu", [&] {
    using A = acc_t<scalar_t>;
    with_noise<scalar_t>(e, p, [&](const auto* noise) {
      with_terms<scalar_t>(x0, coef, p.size(0), [&](const scalar_t* x0p, auto row_terms) {
        iso_grad_kernel<scalar_t>(p.data_ptr<scalar_t>(), noise, x0p, row_terms, static_cast<uint64_t>(seed),
                                  static_cast<uint64_t>(offset), c1.data_ptr<A>(), c2.data_ptr<A>(),
                                  g.data_ptr<scalar_t>(), p.size(0), p.size(1));
      });
    });
  });
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) {
  m.impl("iso_sums", &iso_sums_cpu);
  m.impl("iso_grad", &iso_grad_cpu);
}

}  // namespace isofast::cpu
