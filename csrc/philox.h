// The noise contract of ARCHITECTURE.md, header-only, for host (g++) and device (nvcc).
//
// A draw is keyed by (seed, offset), both uint64. Element i of the draw is the (i mod 4)-th
// normal of one Philox4x32-10 call at counter c = offset + i/4:
//   (r0, r1, r2, r3) = Philox4x32-10(counter = (lo32 c, hi32 c, 0, 0), key = (lo32 seed, hi32 seed))
//   u_k = float(x_k) * 4.6566127342e-10f   with x_k = int32(r_k), x_k = ~x_k if negative
//   (n0, n1) = BoxMuller(u0, u1), (n2, n3) = BoxMuller(u2, u3) in float32:
//   r = sqrt(-2 log max(u_a, 1e-7)), theta = 6.283185307179586f * u_b, (r cos theta, r sin theta)
// The integers equal triton.language.randint4x(seed, c) bit for bit; the normals equal
// triton.language.randn4x(seed, c) up to the last bits of log/sin/cos.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ISOFAST_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define ISOFAST_HD inline __attribute__((always_inline))
#endif

namespace isofast {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr float kUniformScale = 4.6566127342e-10f;  // largest scale with INT32_MAX * scale < 1
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;

ISOFAST_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 of counter c and key seed; the four 32-bit words in r.
ISOFAST_HD void philox4x32_10(uint64_t seed, uint64_t c, uint32_t r[4]) {
  uint32_t c0 = static_cast<uint32_t>(c), c1 = static_cast<uint32_t>(c >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__) || defined(__HIPCC__)
#pragma unroll
#else
#pragma GCC unroll 10  // fully unrolled so that loops over counters vectorise across calls
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mulhi32(kPhiloxRoundB, c2), lo_b = kPhiloxRoundB * c2;
    const uint32_t hi_a = mulhi32(kPhiloxRoundA, c0), lo_a = kPhiloxRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  r[0] = c0;
  r[1] = c1;
  r[2] = c2;
  r[3] = c3;
}

// Step 2 of the contract: uint32 -> float32 uniform in [0, 1).
ISOFAST_HD float uint32_to_uniform(uint32_t r) {
  int32_t x = static_cast<int32_t>(r);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUniformScale;
}

// Step 3: Box-Muller of one pair with the libm (host) / CUDA (device) float functions.
ISOFAST_HD void box_muller(float u_first, float u_second, float* out0, float* out1) {
  const float u = u_first > kMinUniform ? u_first : kMinUniform;
  const float theta = kTwoPi * u_second;
#if defined(__CUDA_ARCH__)
  const float radius = sqrtf(-2.0f * logf(u));
  float s, co;
  sincosf(theta, &s, &co);  // the accurate sincosf (no --use_fast_math): within a few ulp of the reference
  *out0 = radius * co;
  *out1 = radius * s;
#else
  const float radius = std::sqrt(-2.0f * std::log(u));
  *out0 = radius * std::cos(theta);
  *out1 = radius * std::sin(theta);
#endif
}

// The four normals of counter c (elements 4(c - offset) .. 4(c - offset) + 3 of a draw).
ISOFAST_HD void randn4(uint64_t seed, uint64_t c, float n[4]) {
  uint32_t r[4];
  philox4x32_10(seed, c, r);
  box_muller(uint32_to_uniform(r[0]), uint32_to_uniform(r[1]), &n[0], &n[1]);
  box_muller(uint32_to_uniform(r[2]), uint32_to_uniform(r[3]), &n[2], &n[3]);
}

}  // namespace isofast
