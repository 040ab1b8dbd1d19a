// Debug ops of the noise contract on CUDA (tests and `python -m isofast.selfcheck`): the
// Philox words and the normals of a draw, computed by csrc/philox.h on the device.
#include "cuda_common.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace isofast::cuda {
namespace {

__global__ void philox_bits_kernel(uint64_t seed, uint64_t offset, int64_t calls, uint32_t* __restrict__ out) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < calls; k += int64_t(gridDim.x) * blockDim.x) {
    uint32_t r[4];
    philox4x32_10(seed, offset + static_cast<uint64_t>(k), r);
    reinterpret_cast<uint4*>(out)[k] = make_uint4(r[0], r[1], r[2], r[3]);
  }
}

__global__ void philox_randn_kernel(uint64_t seed, uint64_t offset, int64_t calls, float* __restrict__ out) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < calls; k += int64_t(gridDim.x) * blockDim.x) {
    float z[4];
    randn4(seed, offset + static_cast<uint64_t>(k), z);
    reinterpret_cast<float4*>(out)[k] = make_float4(z[0], z[1], z[2], z[3]);
  }
}

at::Tensor philox_bits_cuda(const at::Tensor& like, int64_t seed, int64_t offset) {
  c10::cuda::CUDAGuard guard(like.device());
  const int64_t calls = (like.numel() + 3) / 4;
  at::Tensor out = at::empty({calls, 4}, like.options().dtype(at::kInt));
  if (calls == 0) return out;
  philox_bits_kernel<<<blocks_for(calls), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), calls,
      reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor philox_randn_cuda(const at::Tensor& like, int64_t seed, int64_t offset, bool /*scalar: host only*/) {
  c10::cuda::CUDAGuard guard(like.device());
  const int64_t numel = like.numel(), calls = (numel + 3) / 4;
  at::Tensor out = at::empty({calls * 4}, like.options().dtype(at::kFloat));
  if (calls > 0) {
    philox_randn_kernel<<<blocks_for(calls), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), calls, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.narrow(0, 0, numel);
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CUDA, m) {
  m.impl("philox_bits", &philox_bits_cuda);
  m.impl("philox_randn", &philox_randn_cuda);
}

}  // namespace isofast::cuda
