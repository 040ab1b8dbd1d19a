// The Iso-Diffusion loss on CUDA: eps is regenerated from the Philox key, never stored.
//   iso_sums: per-row (sum (p - eps)^2, sum p^2); grid (splits, B), each block reduces its part
//             of a row with warp shuffles + shared memory into a partial; a tiny second kernel
//             adds the partials of a row in a fixed order (deterministic, no atomics).
//   iso_grad: g = c1[b] (p - eps) + c2[b] p, elementwise, one pass.
// With x0 and coef (5, B) (v- and x0-prediction) the same passes read x0 too and use the residual
// r = p - (coef0 eps + coef1 x0) and the implied eps h = coef2 p + coef3 eps + coef4 x0 in place of
// p - eps and p: sse = sum r^2, ssq = sum h^2, g = c1 r + c2 coef2 h. AFFINE is a template
// parameter, so the eps kernels are the ones compiled before coef existed.
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

template <typename T, int K, bool VEC, bool AFFINE>
__global__ void iso_partial_kernel(const T* __restrict__ p, const T* __restrict__ e, const T* __restrict__ x0,
                                   const acc_t<T>* __restrict__ coef, uint64_t seed, uint64_t offset, int64_t n,
                                   acc_t<T>* __restrict__ part /* (B, splits, 2) */) {
  using A = acc_t<T>;
  __shared__ A shared[kThreads / 32];
  const int64_t b = blockIdx.y, splits = gridDim.x, B = gridDim.y;
  const int64_t lo = b * n, hi = lo + n;
  const int64_t c_first = lo / K, c_last = (hi - 1) / K;
  A q[5] = {1, 0, 1, 0, 0};  // coef column of row b; eps-prediction: target eps, implied eps p
  if (AFFINE) {
#pragma unroll
    for (int k = 0; k < 5; ++k) q[k] = coef[k * B + b];
  }
  A s_err = 0, s_sq = 0;
  for (int64_t c = c_first + blockIdx.x * int64_t(kThreads) + threadIdx.x; c <= c_last; c += splits * kThreads) {
    const int64_t i0 = c * K;
    A pv[K], ev[K], xv[K];
    load_chunk<T, K, VEC>(p, i0, lo, hi, pv);  // zero outside the row: contributes nothing
    noise_or_load_chunk<T, K, VEC, /*ZERO_OUTSIDE=*/true>(e, seed, offset, i0, lo, hi, ev);
    if (AFFINE) load_chunk<T, K, VEC>(x0, i0, lo, hi, xv);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (AFFINE) {
        const A d = pv[k] - (q[0] * ev[k] + q[1] * xv[k]), h = q[2] * pv[k] + q[3] * ev[k] + q[4] * xv[k];
        s_err += d * d;
        s_sq += h * h;
      } else {
        const A d = pv[k] - ev[k];
        s_err += d * d;
        s_sq += pv[k] * pv[k];
      }
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

// The coefficients of a row b of v- or x0-prediction: c1[b], c2[b] coef2[b] and its coef column.
template <typename A>
struct AffineGradCoef {
  A k1, k2h, tgt_eps, tgt_x0, hat_p, hat_eps, hat_x0;
};

template <typename T, int K, bool VEC>
__global__ void iso_grad_affine_kernel(const T* __restrict__ p, const T* __restrict__ e, const T* __restrict__ x0,
                                       const acc_t<T>* __restrict__ coef, uint64_t seed, uint64_t offset,
                                       const acc_t<T>* __restrict__ c1, const acc_t<T>* __restrict__ c2,
                                       T* __restrict__ g, int64_t N, int64_t n) {
  using A = acc_t<T>;
  const int64_t B = N / n;
  auto row = [=](int64_t b) {
    return AffineGradCoef<A>{c1[b], c2[b] * coef[2 * B + b], coef[b], coef[B + b], coef[2 * B + b],
                             coef[3 * B + b], coef[4 * B + b]};
  };
  auto elem = [](const AffineGradCoef<A>& q, A eps, A pv, A xv) {
    const A r = pv - (q.tgt_eps * eps + q.tgt_x0 * xv), h = q.hat_p * pv + q.hat_eps * eps + q.hat_x0 * xv;
    return q.k1 * r + q.k2h * h;
  };
  for_each_chunk<T, K, VEC>(N, n, e, seed, offset, g, row, elem, p, x0);
}

std::tuple<at::Tensor, at::Tensor> iso_sums_cuda(const at::Tensor& p, const std::optional<at::Tensor>& e,
                                                 int64_t seed, int64_t offset, const std::optional<at::Tensor>& x0,
                                                 const std::optional<at::Tensor>& coef) {
  constexpr const char* op = "isofast_C::iso_sums";
  check_iso_sums_args(p, e, x0, coef, op);
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
    const scalar_t* xp = x0.has_value() ? x0->data_ptr<scalar_t>() : nullptr;
    const A* cp = coef.has_value() ? coef->data_ptr<A>() : nullptr;
    const bool vec = packs_aligned<scalar_t>({p.data_ptr(), ep, xp});
    // Split a row over blocks only as far as it takes to fill the GPU (~4 blocks per SM in all).
    const int64_t chunks_per_row = (n + K - 1) / K + 1;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    int64_t splits = std::min<int64_t>((chunks_per_row + kThreads - 1) / kThreads, (4 * sms + B - 1) / B);
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
    TORCH_CHECK(B <= 65535, op, ": at most 65535 samples per call on CUDA, got ", B);
    at::Tensor part = at::empty({B, splits, 2}, p.options().dtype(acc));
    const dim3 grid(static_cast<unsigned int>(splits), static_cast<unsigned int>(B));
    launch_vec(vec, [&](auto vec_tag) {
      constexpr bool V = decltype(vec_tag)::value;
      auto kernel = cp == nullptr ? iso_partial_kernel<scalar_t, K, V, false> : iso_partial_kernel<scalar_t, K, V, true>;
      kernel<<<grid, kThreads, 0, stream>>>(p.data_ptr<scalar_t>(), ep, xp, cp, static_cast<uint64_t>(seed),
                                            static_cast<uint64_t>(offset), n, part.data_ptr<A>());
    });
    iso_finish_kernel<A><<<static_cast<unsigned int>((B + 127) / 128), 128, 0, stream>>>(
        part.data_ptr<A>(), B, splits, sse.data_ptr<A>(), ssq.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sse, ssq};
}

at::Tensor iso_grad_cuda(const at::Tensor& p, const std::optional<at::Tensor>& e, int64_t seed, int64_t offset,
                         const at::Tensor& c1, const at::Tensor& c2, const std::optional<at::Tensor>& x0,
                         const std::optional<at::Tensor>& coef) {
  constexpr const char* op = "isofast_C::iso_grad";
  check_iso_grad_args(p, e, c1, c2, x0, coef, op);
  const auto s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  if (coef.has_value()) {
    auto launch = [&](auto vec, const auto* ep, auto* g, const ChunkGrid& grid) {
      using T = std::remove_pointer_t<decltype(g)>;
      using A = acc_t<T>;
      iso_grad_affine_kernel<T, chunk_of<T>(), decltype(vec)::value><<<grid.blocks, kThreads, 0, grid.stream>>>(
          p.data_ptr<T>(), ep, x0->data_ptr<T>(), coef->data_ptr<A>(), s, o, c1.data_ptr<A>(), c2.data_ptr<A>(), g,
          grid.N, grid.n);
    };
    return launch_elementwise(p, {x0->data_ptr()}, e, launch);
  }
  auto launch = [&](auto vec, const auto* ep, auto* g, const ChunkGrid& grid) {
    using T = std::remove_pointer_t<decltype(g)>;
    using A = acc_t<T>;
    iso_grad_kernel<T, chunk_of<T>(), decltype(vec)::value><<<grid.blocks, kThreads, 0, grid.stream>>>(
        p.data_ptr<T>(), ep, s, o, c1.data_ptr<A>(), c2.data_ptr<A>(), g, grid.N, grid.n);
  };
  return launch_elementwise(p, {}, e, launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CUDA, m) {
  m.impl("iso_sums", &iso_sums_cuda);
  m.impl("iso_grad", &iso_grad_cuda);
}

}  // namespace isofast::cuda
