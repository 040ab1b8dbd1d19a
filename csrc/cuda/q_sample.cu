// q_sample on CUDA: x_t[b] = sqrt_ab[t[b]] x0[b] + sqrt_1mab[t[b]] eps[b] in one pass; eps from
// the Philox key in-kernel (four normals per call) unless given; 16-byte loads when aligned.
#include "cuda_common.cuh"
#include "../checks.h"

#include <torch/library.h>

#include <optional>

namespace isofast::cuda {
namespace {

// The coefficients of a row b: sqrt_ab[t[b]] and sqrt_1mab[t[b]].
template <typename A>
struct QCoef {
  A a, s;
};

template <typename T, int K, bool VEC>
__global__ void q_sample_kernel(const T* __restrict__ x0, const int64_t* __restrict__ t,
                                const acc_t<T>* __restrict__ sa, const acc_t<T>* __restrict__ sb,
                                const T* __restrict__ e, uint64_t seed, uint64_t offset, T* __restrict__ out,
                                int64_t N, int64_t n) {
  using A = acc_t<T>;
  auto row = [=](int64_t b) {
    const int64_t tb = t[b];
    return QCoef<A>{sa[tb], sb[tb]};
  };
  // a x + s eps rounded as fma(a, x, s eps), written out: left to contraction, which product the
  // compiler fuses depends on the code around it (it changed when this loop moved into
  // for_each_chunk), and with it the last bit of x_t.
  auto elem = [](const QCoef<A>& q, A eps, A x) { return fma(q.a, x, q.s * eps); };
  for_each_chunk<T, K, VEC>(N, n, e, seed, offset, out, row, elem, x0);
}

at::Tensor q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1mab, const std::optional<at::Tensor>& e, int64_t seed,
                         int64_t offset) {
  constexpr const char* op = "isofast_C::q_sample";
  check_q_sample_args(x0, t, sqrt_ab, sqrt_1mab, e, op);
  auto launch = [&](auto vec, const auto* ep, auto* out, const ChunkGrid& g) {
    using T = std::remove_pointer_t<decltype(out)>;
    using A = acc_t<T>;
    q_sample_kernel<T, chunk_of<T>(), decltype(vec)::value><<<g.blocks, kThreads, 0, g.stream>>>(
        x0.data_ptr<T>(), t.data_ptr<int64_t>(), sqrt_ab.data_ptr<A>(), sqrt_1mab.data_ptr<A>(), ep,
        static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), out, g.N, g.n);
  };
  return launch_elementwise(x0, {}, e, launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CUDA, m) { m.impl("q_sample", &q_sample_cuda); }

}  // namespace isofast::cuda
