// Sampler steps on CUDA, one pass each. The step indices t/t_prev and the noise key (seed,
// offset) are read from device memory inside the kernel, so a captured CUDA graph replays
// with whatever the caller wrote there (no host sync, no baked-in scalars besides eta).
// The coefficients and the formula: step_coefficients.h.
#include "cuda_common.cuh"
#include "../checks.h"
#include "../step_coefficients.h"

#include <torch/library.h>

#include <optional>

namespace isofast::cuda {
namespace {

struct DdpmRow {
  const int64_t* t;
  int64_t T;
  template <typename A>
  __device__ __forceinline__ StepCoef<A> operator()(int64_t b, const A* tab) const {
    const int64_t s = t[b];
    CUDA_KERNEL_ASSERT(s >= 0 && s < T);
    return ddpm_coef(tab, T, s);
  }
};

struct DdimRow {
  const int64_t* t;
  const int64_t* t_prev;
  int64_t T;
  double eta;
  template <typename A>
  __device__ __forceinline__ StepCoef<A> operator()(int64_t b, const A* tab) const {
    const int64_t s = t[b], sp = t_prev[b];
    CUDA_KERNEL_ASSERT(s >= 0 && s < T && sp >= -1 && sp < s);  // a DDIM step goes back in time
    return ddim_coef(tab, T, s, sp, static_cast<A>(eta));
  }
};

// kDdim: the third term is m * eps (DDIM), else m * x (DDPM).
template <bool kDdim, typename T, int K, bool VEC, typename Row>
__global__ void step_kernel(const T* __restrict__ x, const T* __restrict__ ep, const acc_t<T>* __restrict__ table,
                            Row row, const T* __restrict__ e, const int64_t* __restrict__ key, bool clip,
                            T* __restrict__ out, int64_t N, int64_t n) {
  using A = acc_t<T>;
  const uint64_t seed = key != nullptr ? static_cast<uint64_t>(key[0]) : 0;  // key is null only when e is given
  const uint64_t offset = key != nullptr ? static_cast<uint64_t>(key[1]) : 0;
  auto coef = [=](int64_t b) { return row(b, table); };
  auto elem = [=](const StepCoef<A>& q, A z, A xv, A ev) {
    A x0 = q.a * xv - q.b * ev;
    if (clip) x0 = x0 < A(-1) ? A(-1) : (x0 > A(1) ? A(1) : x0);
    if constexpr (kDdim) {
      return q.c * x0 + q.m * ev + q.s * z;
    } else {
      return q.c * x0 + q.m * xv + q.s * z;
    }
  };
  for_each_chunk<T, K, VEC>(N, n, e, seed, offset, out, coef, elem, x, ep);
}

template <bool kDdim, typename Row>
at::Tensor launch_step(const at::Tensor& x, const at::Tensor& eps_pred, const at::Tensor& table, Row row,
                       const std::optional<at::Tensor>& e, const std::optional<at::Tensor>& key, bool clip_x0) {
  auto launch = [&](auto vec, const auto* zp, auto* out, const ChunkGrid& g) {
    using T = std::remove_pointer_t<decltype(out)>;
    step_kernel<kDdim, T, chunk_of<T>(), decltype(vec)::value, Row><<<g.blocks, kThreads, 0, g.stream>>>(
        x.data_ptr<T>(), eps_pred.data_ptr<T>(), table.data_ptr<acc_t<T>>(), row, zp,
        key.has_value() ? key->data_ptr<int64_t>() : nullptr, clip_x0, out, g.N, g.n);
  };
  return launch_elementwise(x, {eps_pred.data_ptr()}, e, launch);
}

at::Tensor ddpm_step_cuda(const at::Tensor& x, const at::Tensor& eps_pred, const at::Tensor& t,
                          const at::Tensor& table, const std::optional<at::Tensor>& e, const std::optional<at::Tensor>& key,
                          bool clip_x0) {
  constexpr const char* op = "isofast_C::ddpm_step";
  check_ddpm_step_args(x, eps_pred, t, table, e, key, op);
  return launch_step<false>(x, eps_pred, table, DdpmRow{t.data_ptr<int64_t>(), table.size(1)}, e, key, clip_x0);
}

at::Tensor ddim_step_cuda(const at::Tensor& x, const at::Tensor& eps_pred, const at::Tensor& t,
                          const at::Tensor& t_prev, const at::Tensor& table, double eta,
                          const std::optional<at::Tensor>& e, const std::optional<at::Tensor>& key, bool clip_x0) {
  constexpr const char* op = "isofast_C::ddim_step";
  check_ddim_step_args(x, eps_pred, t, t_prev, table, e, key, op);
  DdimRow row{t.data_ptr<int64_t>(), t_prev.data_ptr<int64_t>(), table.size(1), eta};
  return launch_step<true>(x, eps_pred, table, row, e, key, clip_x0);
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CUDA, m) {
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("ddim_step", &ddim_step_cuda);
}

}  // namespace isofast::cuda
