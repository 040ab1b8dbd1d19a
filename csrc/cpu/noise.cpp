// The noise contract on the CPU, vectorised across Philox calls.
//
// philox.h gives the scalar contract (libm log/sin/cos, which do not vectorise). Here the same
// integers and uniforms feed float32 log and sincos written branch-free (Cephes' minimax
// polynomials, ~1 ulp on the ranges used: u in [1e-7, 1), theta in [0, 2 pi)), so that the loop
// over calls vectorises. The normals stay within a few ulp of the reference (tests check 4e-6).
// fill_normals is cloned for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time,
// so the extension stays portable.
//
// Vectorisation (g++ 12 -O3 -fopt-info-vec-optimized): the Philox, uniform and Box-Muller loops
// of fill_normals are vectorised in every clone ("loop vectorized using 64 byte vectors" for
// x86-64-v4, 32 for v3, 16 for the baseline).
//
// Regenerate vs. materialise (measured, B=64 x 3072 float32, 2 cores): fill_normals makes the
// 196608 normals in ~0.2 ms, about 5x the cost of reading them back from memory, so on the CPU
// q_sample stores the eps it drew (isofast_C::q_sample_noise) and iso_sums/iso_grad read it
// (isofast/ops/compiled.py has the numbers); the GPU kernels regenerate.
#include "cpu_common.h"
#include "../philox.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

namespace isofast::cpu {
namespace {

constexpr int kCalls = 64;  // Philox calls per vector block

inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// Natural log of a normal positive float (Cephes logf).
inline float log_poly(float x) {
  const uint32_t bits = float_to_bits(x);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 126;  // x = m 2^e, m in [0.5, 1)
  float m = bits_to_float((bits & 0x807fffffu) | 0x3f000000u);
  // Arithmetic instead of selects: GCC if-converts only a few selects per loop body.
  const int32_t small = m < 0.707106781186547524f ? 1 : 0;
  e -= small;
  m = m + m * static_cast<float>(small) - 1.0f;  // 2m - 1 or m - 1, both exact
  const float fe = static_cast<float>(e);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// sin and cos of x in [0, 2 pi] (Cephes sinf/cosf: octant reduction, then the two polynomials).
inline void sincos_poly(float x, float* s_out, float* c_out) {
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);  // 4 / pi
  j = (j + 1) & ~1;
  const float y = static_cast<float>(j);
  const float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const float z = r * r;
  const float ps = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float pc = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                   0.5f * z + 1.0f;
  const int32_t q = (j >> 1) & 3;  // quadrant of x
  const uint32_t swap = 0u - static_cast<uint32_t>(q & 1);  // all ones in odd quadrants: sin <-> cos
  const uint32_t bs = float_to_bits(ps), bc = float_to_bits(pc);
  const float sv = bits_to_float((bc & swap) | (bs & ~swap)), cv = bits_to_float((bs & swap) | (bc & ~swap));
  // Signs by flipping the sign bit (quadrants 2, 3 for sin; 1, 2 for cos).
  *s_out = bits_to_float(float_to_bits(sv) ^ (static_cast<uint32_t>(q & 2) << 30));
  *c_out = bits_to_float(float_to_bits(cv) ^ (static_cast<uint32_t>((q + 1) & 2) << 30));
}

inline float radius_of(float u) {
  // max(u, 1e-7) on the bit patterns: exact for non-negative floats, and an integer max
  // vectorises where GCC keeps the float select as a branch.
  u = bits_to_float(std::max(float_to_bits(u), float_to_bits(kMinUniform)));
  return __builtin_sqrtf(-2.0f * log_poly(u));
}

}  // namespace

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void fill_normals(uint64_t seed, uint64_t counter, int64_t ncalls, float* out) {
  alignas(64) float u0[kCalls], u1[kCalls], u2[kCalls], u3[kCalls];
  alignas(64) float n0[kCalls], n1[kCalls], n2[kCalls], n3[kCalls];
  for (int64_t base = 0; base < ncalls; base += kCalls) {
    for (int k = 0; k < kCalls; ++k) {  // a whole block even past ncalls: keeps the loop branch-free
      uint32_t r[4];
      philox4x32_10(seed, counter + static_cast<uint64_t>(base + k), r);
      u0[k] = uint32_to_uniform(r[0]);
      u1[k] = uint32_to_uniform(r[1]);
      u2[k] = uint32_to_uniform(r[2]);
      u3[k] = uint32_to_uniform(r[3]);
    }
    for (int k = 0; k < kCalls; ++k) {
      const float ra = radius_of(u0[k]), rb = radius_of(u2[k]);
      float sa, ca, sb, cb;
      sincos_poly(kTwoPi * u1[k], &sa, &ca);
      sincos_poly(kTwoPi * u3[k], &sb, &cb);
      n0[k] = ra * ca;
      n1[k] = ra * sa;
      n2[k] = rb * cb;
      n3[k] = rb * sb;
    }
    const int64_t m = std::min<int64_t>(kCalls, ncalls - base);
    float* o = out + 4 * base;
    for (int64_t k = 0; k < m; ++k) {
      o[4 * k + 0] = n0[k];
      o[4 * k + 1] = n1[k];
      o[4 * k + 2] = n2[k];
      o[4 * k + 3] = n3[k];
    }
  }
}

namespace {

// Debug op: the Philox words behind a draw of like.numel() elements, int32 (ceil(numel/4), 4).
at::Tensor philox_bits_cpu(const at::Tensor& like, int64_t seed, int64_t offset) {
  const int64_t calls = (like.numel() + 3) / 4;
  at::Tensor out = at::empty({calls, 4}, like.options().dtype(at::kInt));
  auto* o = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  for (int64_t k = 0; k < calls; ++k) {
    philox4x32_10(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset) + static_cast<uint64_t>(k), o + 4 * k);
  }
  return out;
}

// Debug op: the normals of the draw (seed, offset) of like.numel() elements, float32 (numel,).
// scalar=false: the vectorised generator the kernels use; scalar=true: philox.h's randn4 (libm).
at::Tensor philox_randn_cpu(const at::Tensor& like, int64_t seed, int64_t offset, bool scalar) {
  const int64_t numel = like.numel(), calls = (numel + 3) / 4;
  at::Tensor out = at::empty({calls * 4}, like.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  if (scalar) {
    for (int64_t k = 0; k < calls; ++k) {
      randn4(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset) + static_cast<uint64_t>(k), o + 4 * k);
    }
  } else {
    fill_normals(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), calls, o);
  }
  return out.narrow(0, 0, numel);
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) {
  m.impl("philox_bits", &philox_bits_cpu);
  m.impl("philox_randn", &philox_randn_cpu);
}

}  // namespace isofast::cpu
