// torch.linalg.vector_norm's sum of squares for float32, step for step (aten/src/ATen/native/cpu/
// ReduceOpsKernel.cpp, norm_kernel_tensor_iterator_impl, the contiguous last-dimension path): `lanes` running sums
// acc[d % lanes] += x[d] * x[d] (a multiply, then an add), the lanes folded left into acc[0], then the square
// root. Only for lengths that are multiples of `lanes`: there is then no remainder loop (whose fused
// multiply-add depends on how torch was compiled), and the arithmetic is data-independent, so one check on
// random data (isofast/ensemble.py: _verified_norm_lanes) tells whether a lane count is torch's here. Used by
// the ensemble's clipping norms (clip_norms.cpp, ensemble_mlp.cpp). Include it only where the compiler cannot
// fuse the multiply into the add: the baseline x86-64 build (SSE2, no FMA), no target_clones.
#pragma once

#include <cmath>
#include <cstdint>

namespace isofast::cpu {

template <int kLanes>
float aten_norm2_lanes(const float* x, int64_t n) {
  float acc[kLanes] = {};
  for (int64_t d = 0; d < n; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float square = x[d + j] * x[d + j];
      acc[j] = acc[j] + square;
    }
  }
  float sum = acc[0];
  for (int j = 1; j < kLanes; ++j) sum = sum + acc[j];
  return std::sqrt(sum);
}

// The norm of x (n elements, n a multiple of lanes; lanes 8 or 16).
inline float aten_norm2(const float* x, int64_t n, int64_t lanes) {
  return lanes == 16 ? aten_norm2_lanes<16>(x, n) : aten_norm2_lanes<8>(x, n);
}

}  // namespace isofast::cpu
