// q_sample on CUDA: x_t[b] = sqrt_ab[t[b]] x0[b] + sqrt_1mab[t[b]] eps[b] in one pass; eps from
// the Philox key in-kernel (four normals per call) unless given; 16-byte loads when aligned.
#include "cuda_common.cuh"
#include "../checks.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>

namespace isofast::cuda {
namespace {

template <typename T, int K, bool VEC>
__global__ void q_sample_kernel(const T* __restrict__ x0, const int64_t* __restrict__ t,
                                const acc_t<T>* __restrict__ sa, const acc_t<T>* __restrict__ sb,
                                const T* __restrict__ e, uint64_t seed, uint64_t offset, T* __restrict__ out,
                                int64_t N, int64_t n) {
  using A = acc_t<T>;
  const int64_t chunks = (N + K - 1) / K;
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < chunks; c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i0 = c * K;
    A xv[K], ev[K], o[K];
    int64_t rows[K];
    load_chunk<T, K, VEC>(x0, i0, 0, N, xv);
    if (e != nullptr) {
      load_chunk<T, K, VEC>(e, i0, 0, N, ev);
    } else {
      float z[K];
      noise_chunk<K>(seed, offset, i0, z);
#pragma unroll
      for (int k = 0; k < K; ++k) ev[k] = static_cast<A>(z[k]);
    }
    rows_of_chunk<K>(i0, n, rows);
    int64_t b = -1;
    A a = 0, s = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (rows[k] != b && i0 + k < N) {
        b = rows[k];
        const int64_t tb = t[b];
        a = sa[tb];
        s = sb[tb];
      }
      o[k] = a * xv[k] + s * ev[k];
    }
    store_chunk<T, K, VEC>(out, i0, N, o);
  }
}

at::Tensor q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1mab, const std::optional<at::Tensor>& e, int64_t seed,
                         int64_t offset) {
  constexpr const char* op = "isofast_C::q_sample";
  check_q_sample_args(x0, t, sqrt_ab, sqrt_1mab, e, op);
  c10::cuda::CUDAGuard guard(x0.device());
  at::Tensor out = at::empty_like(x0);
  const int64_t N = x0.numel(), n = x0.size(1);
  if (N == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x0.scalar_type(), "isofast_q_sample_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int K = chunk_of<scalar_t>();
    const scalar_t* ep = e.has_value() ? e->data_ptr<scalar_t>() : nullptr;
    const bool vec = packs_aligned<scalar_t>({x0.data_ptr(), ep, out.data_ptr()});
    const unsigned int blocks = blocks_for((N + K - 1) / K);
    auto launch = [&](auto vec_tag) {
      q_sample_kernel<scalar_t, K, decltype(vec_tag)::value><<<blocks, kThreads, 0, stream>>>(
          x0.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), sqrt_ab.data_ptr<A>(), sqrt_1mab.data_ptr<A>(), ep,
          static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), out.data_ptr<scalar_t>(), N, n);
    };
    if (vec) launch(std::true_type{}); else launch(std::false_type{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CUDA, m) { m.impl("q_sample", &q_sample_cuda); }

}  // namespace isofast::cuda
