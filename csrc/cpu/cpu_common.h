// Shared machinery of the CPU kernels: the tiled walk over (B, n) data with the contract's
// noise generated per tile, and small helpers.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace isofast::cpu {

// Elements per tile: the normals of one tile live in a stack buffer that stays in L1 while the
// elementwise loop consumes them, so eps never touches memory.
constexpr int64_t kTile = 2048;

// Normals of the Philox calls counter .. counter + ncalls - 1 (4 per call, contract order) into out.
// Vectorised across calls; dispatched at load time to the widest ISA of the machine (noise.cpp).
void fill_normals(uint64_t seed, uint64_t counter, int64_t ncalls, float* out);

// The instruction set fill_normals runs with on this CPU ("AVX-512", "AVX2", ...), for `isofast info`.
const char* noise_isa();

// True where the CPU has AVX-512 (x86-64-v4) and ISOFAST_NO_AVX512 is unset: the one switch of every AVX-512 path
// (the noise generator, the ensemble's sampling forward); ISOFAST_NO_AVX512=1 takes the portable paths on an
// AVX-512 machine, for tests and comparisons. Read once per process.
inline bool use_avx512() {
#if defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("x86-64-v4") && std::getenv("ISOFAST_NO_AVX512") == nullptr;
  return avx512;
#else
  return false;
#endif
}

// How the ensemble's sampling forward runs its layers on this CPU ("AVX-512" register tiles, or "sgemm"), for
// `isofast info` (ensemble_mlp.cpp).
const char* sampler_isa();

// Arithmetic type of a data type: float64 for float64, float32 otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// x_t[j] = a x0[j] + c eps[j] over one row of n: q_sample's arithmetic, in the accumulation type A (a multiply and
// an add: the kernels are compiled for the baseline ISA, without fused multiply-add). The q_sample op and the
// ensemble's training step both call it: a member's x_t must be its single run's bit for bit.
template <typename T, typename E>
inline void q_sample_row(const T* x0, const E* eps, acc_t<T> a, acc_t<T> c, int64_t n, T* out) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(a * static_cast<A>(x0[j]) + c * static_cast<A>(eps[j]));
}

// t[b] must index a table of length T (checked once per call on the host; never an out-of-bounds read).
inline void check_steps(const int64_t* t, int64_t B, int64_t T, bool allow_minus_one, const char* op,
                        const char* name) {
  const int64_t lo = allow_minus_one ? -1 : 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(t[b] >= lo && t[b] < T, op, ": ", name, "[", b, "] = ", t[b], " is outside [", lo, ", ", T, ")");
  }
}

// Calls body(b, j0, j1, z) for every tile [j0, j1) of every row b, in parallel over tiles.
// z points at the contract normals of elements b*n + j0 .. b*n + j1 - 1 of the draw (seed, offset)
// when gen(b) is true, and is nullptr otherwise (explicit noise, or a row that needs none).
template <typename Gen, typename Body>
void for_each_tile(int64_t B, int64_t n, uint64_t seed, uint64_t offset, Gen&& gen, Body&& body) {
  if (n < kTile / 2) {
    // Short rows (2-D points: n = 2): a tile holds several whole rows, so one fill_normals call
    // serves them all and neighbouring rows do not each recompute the Philox call they share.
    const int64_t rows_per_tile = kTile / n;
    const int64_t tiles = (B + rows_per_tile - 1) / rows_per_tile;
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (rows_per_tile * n));
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      alignas(64) float buf[kTile + 8];
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t b0 = tile * rows_per_tile, b1 = std::min(B, b0 + rows_per_tile);
        bool any = false;
        for (int64_t b = b0; b < b1 && !any; ++b) any = gen(b);
        const float* z = nullptr;
        if (any) {
          const int64_t i0 = b0 * n, i1 = b1 * n;
          const int64_t c0 = i0 >> 2, c1 = (i1 + 3) >> 2;
          fill_normals(seed, offset + static_cast<uint64_t>(c0), c1 - c0, buf);
          z = buf + (i0 & 3);
        }
        for (int64_t b = b0; b < b1; ++b) body(b, 0, n, (any && gen(b)) ? z + (b - b0) * n : nullptr);
      }
    });
    return;
  }
  const int64_t tiles_per_row = (n + kTile - 1) / kTile;
  const int64_t tiles = B * tiles_per_row;
  // grain: enough tiles per task to amortise the thread hand-off (~32k elements).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::min(n, kTile));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kTile + 8];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / tiles_per_row;
      const int64_t j0 = (tile % tiles_per_row) * kTile;
      const int64_t j1 = std::min(n, j0 + kTile);
      const float* z = nullptr;
      if (gen(b)) {
        const int64_t i0 = b * n + j0, i1 = b * n + j1;  // flat indices of the draw
        const int64_t c0 = i0 >> 2, c1 = (i1 + 3) >> 2;  // Philox calls covering them
        fill_normals(seed, offset + static_cast<uint64_t>(c0), c1 - c0, buf);
        z = buf + (i0 & 3);
      }
      body(b, j0, j1, z);
    }
  });
}

}  // namespace isofast::cpu
