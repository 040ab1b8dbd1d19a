// The Iso-Diffusion loss on CUDA: eps is regenerated from the Philox key, never stored.
//   iso_sums: per-row (sum (p - eps)^2, sum p^2); grid (splits, B), each block reduces its part
//             of a row with warp shuffles + shared memory into a partial; a tiny second kernel
//             adds the partials of a row in a fixed order (deterministic, no atomics).
//   iso_grad: g = c1[b] (p - eps) + c2[b] p, elementwise, one pass.
#include "cuda_common.cuh"
#include "../checks.h"
#include "../row_partials.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace isofast::cuda {
namespace {

template <typename T, int K, bool VEC>
__global__ void iso_partial_kernel(const T* __restrict__ p, const T* __restrict__ e, uint64_t seed, uint64_t offset,
                                   int64_t n, acc_t<T>* __restrict__ part /* (B, splits, 2) */) {
  using A = acc_t<T>;
  __shared__ A shared[kThreads / 32];
  const int64_t b = blockIdx.y, splits = gridDim.x;
  const int64_t lo = b * n, hi = lo + n;
  const int64_t c_first = lo / K, c_last = (hi - 1) / K;
  A s_err = 0, s_sq = 0;
  for (int64_t c = c_first + blockIdx.x * int64_t(kThreads) + threadIdx.x; c <= c_last; c += splits * kThreads) {
    const int64_t i0 = c * K;
    A pv[K], ev[K];
    load_chunk<T, K, VEC>(p, i0, lo, hi, pv);  // zero outside the row: contributes nothing
    noise_or_load_chunk<T, K, VEC, /*ZERO_OUTSIDE=*/true>(e, seed, offset, i0, lo, hi, ev);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const A d = pv[k] - ev[k];
      s_err += d * d;
      s_sq += pv[k] * pv[k];
    }
  }
  s_err = block_sum(s_err, shared);
  s_sq = block_sum(s_sq, shared);
  if (threadIdx.x == 0) {
    part[2 * (b * splits + blockIdx.x)] = s_err;
    part[2 * (b * splits + blockIdx.x) + 1] = s_sq;
  }
}

template <typename A>
__global__ void iso_finish_kernel(const A* __restrict__ part, int64_t B, int64_t splits, A* __restrict__ sse,
                                  A* __restrict__ ssq) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b < B) add_row_partials(part, b, splits, sse, ssq);
}

// The coefficients of a row b: c1[b] and c2[b].
template <typename A>
struct GradCoef {
  A k1, k2;
};

template <typename T, int K, bool VEC>
__global__ void iso_grad_kernel(const T* __restrict__ p, const T* __restrict__ e, uint64_t seed, uint64_t offset,
                                const acc_t<T>* __restrict__ c1, const acc_t<T>* __restrict__ c2, T* __restrict__ g,
                                int64_t N, int64_t n) {
  using A = acc_t<T>;
  auto row = [=](int64_t b) { return GradCoef<A>{c1[b], c2[b]}; };
  auto elem = [](const GradCoef<A>& q, A eps, A pv) { return q.k1 * (pv - eps) + q.k2 * pv; };
  for_each_chunk<T, K, VEC>(N, n, e, seed, offset, g, row, elem, p);
}

std::tuple<at::Tensor, at::Tensor> iso_sums_cuda(const at::Tensor& p, const std::optional<at::Tensor>& e,
                                                 int64_t seed, int64_t offset) {
  constexpr const char* op = "isofast_C::iso_sums";
  check_iso_sums_args(p, e, op);
  c10::cuda::CUDAGuard guard(p.device());
  const int64_t B = p.size(0), n = p.size(1);
  const auto acc = table_dtype(p.scalar_type());
  at::Tensor sse = at::empty({B}, p.options().dtype(acc)), ssq = at::empty({B}, p.options().dtype(acc));
  if (B == 0) return {sse, ssq};
  if (n == 0) {
    sse.zero_();
    ssq.zero_();
    return {sse, ssq};
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "isofast_iso_sums_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int K = chunk_of<scalar_t>();
    const scalar_t* ep = e.has_value() ? e->data_ptr<scalar_t>() : nullptr;
    const bool vec = packs_aligned<scalar_t>({p.data_ptr(), ep});
    // Split a row over blocks only as far as it takes to fill the GPU (~4 blocks per SM in all).
    const int64_t chunks_per_row = (n + K - 1) / K + 1;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    int64_t splits = std::min<int64_t>((chunks_per_row + kThreads - 1) / kThreads, (4 * sms + B - 1) / B);
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
    TORCH_CHECK(B <= 65535, op, ": at most 65535 samples per call on CUDA, got ", B);
    at::Tensor part = at::empty({B, splits, 2}, p.options().dtype(acc));
    const dim3 grid(static_cast<unsigned int>(splits), static_cast<unsigned int>(B));
    launch_vec(vec, [&](auto vec_tag) {
      iso_partial_kernel<scalar_t, K, decltype(vec_tag)::value><<<grid, kThreads, 0, stream>>>(
          p.data_ptr<scalar_t>(), ep, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), n,
          part.data_ptr<A>());
    });
    iso_finish_kernel<A><<<static_cast<unsigned int>((B + 127) / 128), 128, 0, stream>>>(
        part.data_ptr<A>(), B, splits, sse.data_ptr<A>(), ssq.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sse, ssq};
}

at::Tensor iso_grad_cuda(const at::Tensor& p, const std::optional<at::Tensor>& e, int64_t seed, int64_t offset,
                         const at::Tensor& c1, const at::Tensor& c2) {
  constexpr const char* op = "isofast_C::iso_grad";
  check_iso_grad_args(p, e, c1, c2, op);
  auto launch = [&](auto vec, const auto* ep, auto* g, const ChunkGrid& grid) {
    using T = std::remove_pointer_t<decltype(g)>;
    using A = acc_t<T>;
    iso_grad_kernel<T, chunk_of<T>(), decltype(vec)::value><<<grid.blocks, kThreads, 0, grid.stream>>>(
        p.data_ptr<T>(), ep, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), c1.data_ptr<A>(),
        c2.data_ptr<A>(), g, grid.N, grid.n);
  };
  return launch_elementwise(p, {}, e, launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CUDA, m) {
  m.impl("iso_sums", &iso_sums_cuda);
  m.impl("iso_grad", &iso_grad_cuda);
}

}  // namespace isofast::cuda
