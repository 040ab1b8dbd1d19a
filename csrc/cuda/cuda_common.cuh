// Shared device helpers of the CUDA kernels: chunked vector loads/stores, the contract's
// noise for a chunk, row lookup, the elementwise chunk loop, launch sizes and the block reduction.
//
// Work unit: a *chunk* of K consecutive flat elements (flat index i = b*n + j), K = 4 for
// float32/float64 and 8 for 16-bit types, so that one chunk is one (or two) 16-byte loads and
// whole Philox calls (K/4 calls, four normals each). Chunks are flat, not per row: a chunk may
// straddle two rows when n is not a multiple of K, which only changes the row coefficients.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <utility>

#include "../philox.h"

namespace isofast::cuda {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elements per chunk: 16 bytes of 16-bit data, otherwise 4 (one Philox call; two 16-byte loads for double).
template <typename T>
constexpr int chunk_of() {
  return sizeof(T) == 2 ? 8 : 4;
}

template <typename T, int K>
struct alignas(sizeof(T) * K) Pack {
  T v[K];
};

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `work` items: enough to fill the GPU a few times over.
inline unsigned int blocks_for(int64_t work, int threads = kThreads) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t need = (work + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  return static_cast<unsigned int>(need < 1 ? 1 : (need < cap ? need : cap));
}

// Whether every pointer is aligned for Pack<T, K> loads.
template <typename T>
inline bool packs_aligned(std::initializer_list<const void*> ptrs) {
  constexpr uintptr_t a = sizeof(T) * chunk_of<T>();
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % a != 0) return false;
  }
  return true;
}

// Launches a kernel instantiated for VEC = vec: go(std::true_type{}) or go(std::false_type{});
// then checks the launch.
template <typename Go>
inline void launch_vec(bool vec, Go&& go) {
  if (vec) go(std::true_type{}); else go(std::false_type{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[k] = p[i0 + k] in the arithmetic type, for the flat range [lo, hi) (0 elsewhere).
template <typename T, int K, bool VEC>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, int64_t i0, int64_t lo, int64_t hi,
                                           acc_t<T> out[K]) {
  if (VEC && i0 >= lo && i0 + K <= hi) {
    const Pack<T, K> pk = *reinterpret_cast<const Pack<T, K>*>(p + i0);
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = static_cast<acc_t<T>>(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t i = i0 + k;
      out[k] = (i >= lo && i < hi) ? static_cast<acc_t<T>>(p[i]) : acc_t<T>(0);
    }
  }
}

template <typename T, int K, bool VEC>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, int64_t i0, int64_t hi, const acc_t<T> in[K]) {
  if (VEC && i0 + K <= hi) {
    Pack<T, K> pk;
#pragma unroll
    for (int k = 0; k < K; ++k) pk.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Pack<T, K>*>(p + i0) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (i0 + k < hi) p[i0 + k] = static_cast<T>(in[k]);
    }
  }
}

// The contract's normals of flat elements i0 .. i0 + K - 1 (i0 a multiple of 4): K/4 Philox calls.
template <int K>
__device__ __forceinline__ void noise_chunk(uint64_t seed, uint64_t offset, int64_t i0, float z[K]) {
#pragma unroll
  for (int q = 0; q < K / 4; ++q) randn4(seed, offset + static_cast<uint64_t>(i0 / 4 + q), z + 4 * q);
}

// The noise of flat elements i0 .. i0 + K - 1 in the arithmetic type: e's values when e is given
// (0 outside [lo, hi), as load_chunk reads them), else the contract's normals (noise_chunk: K/4
// Philox calls, all four normals used), zeroed outside [lo, hi) only with ZERO_OUTSIDE (a
// reduction needs that; an elementwise kernel never stores those elements).
template <typename T, int K, bool VEC, bool ZERO_OUTSIDE>
__device__ __forceinline__ void noise_or_load_chunk(const T* __restrict__ e, uint64_t seed, uint64_t offset,
                                                    int64_t i0, int64_t lo, int64_t hi, acc_t<T> out[K]) {
  if (e != nullptr) {
    load_chunk<T, K, VEC>(e, i0, lo, hi, out);
  } else {
    float z[K];
    noise_chunk<K>(seed, offset, i0, z);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      out[k] = (!ZERO_OUTSIDE || (i0 + k >= lo && i0 + k < hi)) ? static_cast<acc_t<T>>(z[k]) : acc_t<T>(0);
    }
  }
}

// Row of each element of the chunk starting at flat i0 (rows of n elements).
template <int K>
__device__ __forceinline__ void rows_of_chunk(int64_t i0, int64_t n, int64_t rows[K]) {
  int64_t b, j;
  if (i0 <= INT32_MAX && n <= INT32_MAX) {  // 32-bit division: a few instructions instead of ~70
    const uint32_t q = static_cast<uint32_t>(i0) / static_cast<uint32_t>(n);
    b = q;
    j = i0 - static_cast<int64_t>(q) * n;
  } else {
    b = i0 / n;
    j = i0 - b * n;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    rows[k] = b;
    if (++j == n) {
      j = 0;
      ++b;
    }
  }
}

namespace detail {
template <typename Elem, typename C, typename A, int M, int K, size_t... I>
__device__ __forceinline__ A apply_elem(Elem& elem, const C& coef, A eps, const A (&in)[M][K], int k,
                                        std::index_sequence<I...>) {
  return elem(coef, eps, in[I][k]...);
}
}  // namespace detail

// The grid-stride chunk loop of the elementwise kernels over the N = B*n flat elements of (B, n)
// data: out[i] = elem(row(b), eps_i, in[i]...) in the arithmetic type, for b = i / n and eps_i the
// noise of element i (noise_or_load_chunk: e[i], or element i of the draw (seed, offset)). Per
// chunk: one load of each input (16-byte vectors with VEC), K/4 Philox calls (or a load of e), one
// store; row(b), the row's coefficients (any type), is evaluated once for each row b < B that the
// chunk touches.
template <typename T, int K, bool VEC, typename Row, typename Elem, typename... In>
__device__ __forceinline__ void for_each_chunk(int64_t N, int64_t n, const T* __restrict__ e, uint64_t seed,
                                               uint64_t offset, T* __restrict__ out, Row row, Elem elem,
                                               const In* __restrict__... in) {
  static_assert((std::is_same_v<In, T> && ...), "the inputs have the data type");
  using A = acc_t<T>;
  constexpr int M = sizeof...(In);
  const int64_t chunks = (N + K - 1) / K;
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < chunks; c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i0 = c * K;
    A iv[M][K], ev[K], o[K];
    int64_t rows[K];
    int m = 0;
    (load_chunk<T, K, VEC>(in, i0, 0, N, iv[m++]), ...);
    noise_or_load_chunk<T, K, VEC, false>(e, seed, offset, i0, 0, N, ev);
    rows_of_chunk<K>(i0, n, rows);
    int64_t b = -1;
    decltype(row(b)) coef{};
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (rows[k] != b && i0 + k < N) {
        b = rows[k];
        coef = row(b);
      }
      o[k] = detail::apply_elem(elem, coef, ev[k], iv, k, std::make_index_sequence<M>{});
    }
    store_chunk<T, K, VEC>(out, i0, N, o);
  }
}

// Launch geometry of a for_each_chunk kernel over the N = B*n elements of (B, n) data.
struct ChunkGrid {
  unsigned int blocks;
  cudaStream_t stream;
  int64_t N, n;
};

// The host side of an elementwise op that writes a tensor like x with a for_each_chunk kernel: on
// x's device, out = empty_like(x); unless x is empty, for x's dtype T (checked by the op, so the
// dispatch never fails),
//   launch(vec, e_data, out_data, grid)
// launches the kernel instantiated for VEC = decltype(vec)::value, true when x, the pointers in
// `also`, e and out are all aligned for Pack<T> loads. e_data is e's data (const T*), or nullptr
// when e is None (the kernel generates the noise); out_data is out's (T*).
template <typename Launch>
at::Tensor launch_elementwise(const at::Tensor& x, std::initializer_list<const void*> also,
                              const std::optional<at::Tensor>& e, Launch&& launch) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t N = x.numel();
  if (N == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "isofast_elementwise_cuda", [&] {
    constexpr int K = chunk_of<scalar_t>();
    const ChunkGrid grid{blocks_for((N + K - 1) / K), stream, N, x.size(1)};
    const scalar_t* ep = e.has_value() ? e->data_ptr<scalar_t>() : nullptr;
    scalar_t* outp = out.data_ptr<scalar_t>();
    const bool vec = packs_aligned<scalar_t>({x.data_ptr(), ep, outp}) && packs_aligned<scalar_t>(also);
    launch_vec(vec, [&](auto vec_tag) { launch(vec_tag, ep, outp, grid); });
  });
  return out;
}

// Sum of v over the block (all threads get it in lane 0 of warp 0). blockDim.x = kThreads.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared /* kThreads / 32 */) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : A(0);
  if (warp == 0) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  __syncthreads();  // shared may be reused by the caller
  return v;
}

}  // namespace isofast::cuda
