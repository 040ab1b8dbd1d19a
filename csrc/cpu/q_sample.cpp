// q_sample on the CPU: x_t[b] = sqrt_ab[t[b]] * x0[b] + sqrt_1mab[t[b]] * eps[b], one pass,
// eps generated per tile (never stored) unless given.
// Vectorisation (g++ 12 -fopt-info-vec): the inner loops vectorise (SSE2 baseline) for float32,
// float64 and bfloat16; float16 stays scalar (its conversion is a branchy routine without F16C).
#include "cpu_common.h"
#include "../checks.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace isofast::cpu {
namespace {

template <typename T>
void q_sample_kernel(const T* x0, const int64_t* t, const acc_t<T>* sa, const acc_t<T>* sb, const T* e,
                     uint64_t seed, uint64_t offset, T* out, int64_t B, int64_t n) {
  using A = acc_t<T>;
  for_each_tile(B, n, seed, offset, [&](int64_t) { return e == nullptr; },
                [&](int64_t b, int64_t j0, int64_t j1, const float* z) {
                  const A a = sa[t[b]], c = sb[t[b]];
                  const int64_t at = b * n + j0;
                  if (z != nullptr) {
                    q_sample_row(x0 + at, z, a, c, j1 - j0, out + at);
                  } else {
                    q_sample_row(x0 + at, e + at, a, c, j1 - j0, out + at);
                  }
                });
}

// q_sample that also returns the eps it generated (float32, or float64 for float64 data: the
// same values the loss kernels would regenerate, converted exactly; float32 for 16-bit data too,
// so nothing is rounded), for the CPU backend's materialise-once path (NoiseKey.kept, isofast/ops/q_sample.py).
template <typename T>
void q_sample_noise_kernel(const T* x0, const int64_t* t, const acc_t<T>* sa, const acc_t<T>* sb, uint64_t seed,
                           uint64_t offset, T* out, acc_t<T>* eps, int64_t B, int64_t n) {
  using A = acc_t<T>;
  for_each_tile(B, n, seed, offset, [](int64_t) { return true; },
                [&](int64_t b, int64_t j0, int64_t j1, const float* z) {
                  const A a = sa[t[b]], c = sb[t[b]];
                  const T* x = x0 + b * n;
                  T* o = out + b * n;
                  A* er = eps + b * n;
                  z -= j0;
                  for (int64_t j = j0; j < j1; ++j) {
                    const A zv = static_cast<A>(z[j]);
                    er[j] = zv;
                    o[j] = static_cast<T>(a * static_cast<A>(x[j]) + c * zv);
                  }
                });
}

std::tuple<at::Tensor, at::Tensor> q_sample_noise_cpu(const at::Tensor& x0, const at::Tensor& t,
                                                      const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab,
                                                      int64_t seed, int64_t offset) {
  constexpr const char* op = "isofast_C::q_sample_noise";
  check_q_sample_args(x0, t, sqrt_ab, sqrt_1mab, std::nullopt, op);
  const int64_t B = x0.size(0), n = x0.size(1);
  check_steps(t.data_ptr<int64_t>(), B, sqrt_ab.numel(), false, op, "t");
  at::Tensor out = at::empty_like(x0), eps = at::empty_like(x0, x0.options().dtype(table_dtype(x0.scalar_type())));
  if (x0.numel() == 0) return {out, eps};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x0.scalar_type(), "isofast_q_sample_noise_cpu", [&] {
    using A = acc_t<scalar_t>;
    q_sample_noise_kernel<scalar_t>(x0.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), sqrt_ab.data_ptr<A>(),
                                    sqrt_1mab.data_ptr<A>(), static_cast<uint64_t>(seed),
                                    static_cast<uint64_t>(offset), out.data_ptr<scalar_t>(), eps.data_ptr<A>(), B,
                                    n);
  });
  return {out, eps};
}

at::Tensor q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                        const at::Tensor& sqrt_1mab, const std::optional<at::Tensor>& e, int64_t seed, int64_t offset) {
  constexpr const char* op = "isofast_C::q_sample";
  check_q_sample_args(x0, t, sqrt_ab, sqrt_1mab, e, op);
  const int64_t B = x0.size(0), n = x0.size(1);
  check_steps(t.data_ptr<int64_t>(), B, sqrt_ab.numel(), false, op, "t");
  at::Tensor out = at::empty_like(x0);
  if (x0.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x0.scalar_type(), "isofast_q_sample_cpu", [&] {
    using A = acc_t<scalar_t>;
    q_sample_kernel<scalar_t>(x0.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), sqrt_ab.data_ptr<A>(),
                              sqrt_1mab.data_ptr<A>(), e.has_value() ? e->data_ptr<scalar_t>() : nullptr,
                              static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), out.data_ptr<scalar_t>(), B,
                              n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("q_sample_noise", &q_sample_noise_cpu);
}

}  // namespace isofast::cpu
