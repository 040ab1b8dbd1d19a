// The Iso-Diffusion loss on the CPU, as two one-pass kernels that regenerate eps per tile (or read
// it: the data's dtype, or float32 beside 16-bit data when it is the backend's stored draw):
//   iso_sums: sse[b] = sum_j (p[b,j] - eps[b,j])^2,  ssq[b] = sum_j p[b,j]^2   (float32 / float64 (B,))
//   iso_grad: g[b,j] = c1[b] (p[b,j] - eps[b,j]) + c2[b] p[b,j]                (data dtype)
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

template <typename A, typename P, typename E>
inline void row_sums(const P* __restrict__ p, const E* __restrict__ eps, int64_t len, A* s_err, A* s_sq) {
  lanes_t<A> se_v = {}, sq_v = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    const lanes_t<A> pv = load_lanes<A>(p + j), d = pv - load_lanes<A>(eps + j);
    se_v += d * d;
    sq_v += pv * pv;
  }
  A se[kLanes], sq[kLanes];
  std::memcpy(se, &se_v, sizeof se);
  std::memcpy(sq, &sq_v, sizeof sq);
  for (int l = 0; j < len; ++j, ++l) {
    const A pv = static_cast<A>(p[j]), d = pv - static_cast<A>(eps[j]);
    se[l] += d * d;
    sq[l] += pv * pv;
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

template <typename T, typename E>
void iso_sums_kernel(const T* p, const E* e, uint64_t seed, uint64_t offset, acc_t<T>* sse, acc_t<T>* ssq, int64_t B,
                     int64_t n) {
  using A = acc_t<T>;
  const int64_t tiles_per_row = (n + kTile - 1) / kTile;
  std::vector<double> part(static_cast<size_t>(2 * B * tiles_per_row));
  for_each_tile(B, n, seed, offset, [&](int64_t) { return e == nullptr; },
                [&](int64_t b, int64_t j0, int64_t j1, const float* z) {
                  A s_err, s_sq;
                  if (z != nullptr) {
                    row_sums<A>(p + b * n + j0, z, j1 - j0, &s_err, &s_sq);
                  } else {
                    row_sums<A>(p + b * n + j0, e + b * n + j0, j1 - j0, &s_err, &s_sq);
                  }
                  const int64_t slot = b * tiles_per_row + j0 / kTile;
                  part[2 * slot] = s_err;
                  part[2 * slot + 1] = s_sq;
                });
  for (int64_t b = 0; b < B; ++b) add_row_partials(part.data(), b, tiles_per_row, sse, ssq);
}

template <typename T, typename E>
void iso_grad_kernel(const T* p, const E* e, uint64_t seed, uint64_t offset, const acc_t<T>* c1, const acc_t<T>* c2,
                     T* g, int64_t B, int64_t n) {
  using A = acc_t<T>;
  for_each_tile(B, n, seed, offset, [&](int64_t) { return e == nullptr; },
                [&](int64_t b, int64_t j0, int64_t j1, const float* z) {
                  const A k1 = c1[b], k2 = c2[b];
                  const T* pr = p + b * n;
                  T* gr = g + b * n;
                  if (z != nullptr) {
                    z -= j0;
                    for (int64_t j = j0; j < j1; ++j) {
                      const A pv = static_cast<A>(pr[j]);
                      gr[j] = static_cast<T>(k1 * (pv - static_cast<A>(z[j])) + k2 * pv);
                    }
                  } else {
                    const E* er = e + b * n;
                    for (int64_t j = j0; j < j1; ++j) {
                      const A pv = static_cast<A>(pr[j]);
                      gr[j] = static_cast<T>(k1 * (pv - static_cast<A>(er[j])) + k2 * pv);
                    }
                  }
                });
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
                                                int64_t offset) {
  constexpr const char* op = "isofast_C::iso_sums";
  check_iso_sums_args(p, e, op, /*float32_noise_ok=*/true);
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
      iso_sums_kernel<scalar_t>(p.data_ptr<scalar_t>(), noise, static_cast<uint64_t>(seed),
                                static_cast<uint64_t>(offset), sse.data_ptr<A>(), ssq.data_ptr<A>(), B, n);
    });
  });
  return {sse, ssq};
}

at::Tensor iso_grad_cpu(const at::Tensor& p, const std::optional<at::Tensor>& e, int64_t seed, int64_t offset,
                        const at::Tensor& c1, const at::Tensor& c2) {
  constexpr const char* op = "isofast_C::iso_grad";
  check_iso_grad_args(p, e, c1, c2, op, /*float32_noise_ok=*/true);
  at::Tensor g = at::empty_like(p);
  if (p.numel() == 0) return g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "isofast_iso_grad_cpu", [&] {
    using A = acc_t<scalar_t>;
    with_noise<scalar_t>(e, p, [&](const auto* noise) {
      iso_grad_kernel<scalar_t>(p.data_ptr<scalar_t>(), noise, static_cast<uint64_t>(seed),
                                static_cast<uint64_t>(offset), c1.data_ptr<A>(), c2.data_ptr<A>(),
                                g.data_ptr<scalar_t>(), p.size(0), p.size(1));
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
