// The noise contract on the CPU, vectorised across Philox calls.
//
// philox.h gives the scalar contract (libm log/sin/cos, which do not vectorise). Here the same
// integers and uniforms feed float32 log and sincos written branch-free (Cephes' minimax
// polynomials, ~1 ulp on the ranges used: u in [1e-7, 1), theta in [0, 2 pi)), so that the loop
// over calls vectorises. The normals stay within a few ulp of the reference (tests check 4e-6).
// fill_normals has an AVX-512 version (Philox written with intrinsics, ~2x the compiler's) and a
// portable one cloned for AVX2+FMA and baseline x86-64; the widest the CPU runs is picked at
// run time, so the extension stays portable.
//
// Vectorisation (g++ 12 -O3 -fopt-info-vec-optimized): the Box-Muller loop is vectorised in
// every version (64-byte vectors for AVX-512, 32 for AVX2, 16 for the baseline), the portable
// Philox loop in the AVX2 and baseline clones; the AVX-512 Philox is ~2x the compiler's.
//
// Regenerate vs. materialise: generating the normals costs several reads of them, so on the CPU
// q_sample also returns the eps it drew (isofast_C::q_sample_noise) and the loss reads it
// (NoiseKey.kept); the GPU kernels regenerate. Timings: benchmarks/results/design-measurements.md.
#include "cpu_common.h"
#include "../philox.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// The Philox words of calls start .. start + kCalls - 1 as uniforms: u_w[k] from word w of call k.
// Portable: philox.h's scalar code, which the compiler vectorises across the calls (64-bit
// products of zero-extended lanes; the AVX-512 block below is ~2x faster).
[[gnu::always_inline]] inline void philox_block_portable(uint64_t seed, uint64_t start, float* __restrict__ u0,
                                                         float* __restrict__ u1, float* __restrict__ u2,
                                                         float* __restrict__ u3) {
  for (int k = 0; k < kCalls; ++k) {
    uint32_t r[4];
    philox4x32_10(seed, start + static_cast<uint64_t>(k), r);
    u0[k] = uint32_to_uniform(r[0]);
    u1[k] = uint32_to_uniform(r[1]);
    u2[k] = uint32_to_uniform(r[2]);
    u3[k] = uint32_to_uniform(r[3]);
  }
}

// Box-Muller of a block: (n0, n1) from (u0, u1), (n2, n3) from (u2, u3).
// __restrict__: with eight unrelated pointers GCC will not version the loop for aliasing.
[[gnu::always_inline]] inline void normals_block(const float* __restrict__ u0, const float* __restrict__ u1,
                                                 const float* __restrict__ u2, const float* __restrict__ u3,
                                                 float* __restrict__ n0, float* __restrict__ n1,
                                                 float* __restrict__ n2, float* __restrict__ n3) {
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
}

// The first m calls of a block in the contract's order: out[4k + w] = n_w[k].
[[gnu::always_inline]] inline void store_block(const float* __restrict__ n0, const float* __restrict__ n1,
                                               const float* __restrict__ n2, const float* __restrict__ n3, int64_t m,
                                               float* __restrict__ out) {
  for (int64_t k = 0; k < m; ++k) {
    out[4 * k + 0] = n0[k];
    out[4 * k + 1] = n1[k];
    out[4 * k + 2] = n2[k];
    out[4 * k + 3] = n3[k];
  }
}

#if defined(__x86_64__)
// GCC 12's avx512fintrin.h builds _mm512_undefined_epi32 from a self-initialised variable, which
// -Wall reports at every inlined intrinsic (GCC bug 105593); the code below reads no such value.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// AVX-512 Philox, 16 calls per vector. The 32x32 -> 64-bit products come from vpmuludq on the
// even and the odd lanes (two per multiply), the three-way XORs from one vpternlogd each; the key
// schedule is the same for every lane, so it stays scalar. Same words as philox.h, bit for bit
// (tests/ops/test_noise_ops.py, including counters that carry into the high word).
__attribute__((target("avx512f"), always_inline)) inline void mulhilo16(__m512i x, __m512i m, __m512i& hi,
                                                                         __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, m);                         // lanes 0, 2, ..: full products
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);  // lanes 1, 3, ..
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

__attribute__((target("avx512f"), always_inline)) inline __m512 uniform16(__m512i r) {
  const __m512i x = _mm512_xor_si512(r, _mm512_srai_epi32(r, 31));  // x < 0 ? ~x : x
  return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(kUniformScale));
}

__attribute__((target("avx512f"), always_inline)) inline __m512i splat(uint32_t v) {
  return _mm512_set1_epi32(static_cast<int32_t>(v));
}

__attribute__((target("avx512f"))) inline void philox_block_avx512(uint64_t seed, uint64_t start, float* u0,
                                                                    float* u1, float* u2, float* u3) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int k = 0; k < kCalls; k += 16) {
    const uint64_t first = start + static_cast<uint64_t>(k);
    const __m512i lo_first = splat(static_cast<uint32_t>(first)), hi_first = splat(static_cast<uint32_t>(first >> 32));
    __m512i c0 = _mm512_add_epi32(lo_first, lane);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, lo_first);  // the low word wrapped
    __m512i c1 = _mm512_mask_add_epi32(hi_first, carry, hi_first, splat(1));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m512i hi_a, lo_a, hi_b, lo_b;
      mulhilo16(c2, splat(kPhiloxRoundB), hi_b, lo_b);
      mulhilo16(c0, splat(kPhiloxRoundA), hi_a, lo_a);
      c0 = _mm512_ternarylogic_epi32(hi_b, c1, splat(k0), 0x96);  // hi_b ^ c1 ^ k0
      c2 = _mm512_ternarylogic_epi32(hi_a, c3, splat(k1), 0x96);
      c1 = lo_b;
      c3 = lo_a;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    _mm512_store_ps(u0 + k, uniform16(c0));
    _mm512_store_ps(u1 + k, uniform16(c1));
    _mm512_store_ps(u2 + k, uniform16(c2));
    _mm512_store_ps(u3 + k, uniform16(c3));
  }
}

__attribute__((target("arch=x86-64-v4"))) void fill_normals_avx512(uint64_t seed, uint64_t counter, int64_t ncalls,
                                                                    float* out) {
  alignas(64) float u[4][kCalls], z[4][kCalls];
  for (int64_t base = 0; base < ncalls; base += kCalls) {  // whole blocks even past ncalls: branch-free loops
    philox_block_avx512(seed, counter + static_cast<uint64_t>(base), u[0], u[1], u[2], u[3]);
    normals_block(u[0], u[1], u[2], u[3], z[0], z[1], z[2], z[3]);
    store_block(z[0], z[1], z[2], z[3], std::min<int64_t>(kCalls, ncalls - base), out + 4 * base);
  }
}
#pragma GCC diagnostic pop
#endif

__attribute__((target_clones("arch=x86-64-v3", "default")))
void fill_normals_portable(uint64_t seed, uint64_t counter, int64_t ncalls, float* out) {
  alignas(64) float u[4][kCalls], z[4][kCalls];
  for (int64_t base = 0; base < ncalls; base += kCalls) {
    philox_block_portable(seed, counter + static_cast<uint64_t>(base), u[0], u[1], u[2], u[3]);
    normals_block(u[0], u[1], u[2], u[3], z[0], z[1], z[2], z[3]);
    store_block(z[0], z[1], z[2], z[3], std::min<int64_t>(kCalls, ncalls - base), out + 4 * base);
  }
}

}  // namespace

void fill_normals(uint64_t seed, uint64_t counter, int64_t ncalls, float* out) {
#if defined(__x86_64__)
  if (use_avx512()) return fill_normals_avx512(seed, counter, ncalls, out);
#endif
  fill_normals_portable(seed, counter, ncalls, out);
}

const char* noise_isa() {
  if (use_avx512()) return "AVX-512";
#if defined(__x86_64__)
  return __builtin_cpu_supports("x86-64-v3") ? "AVX2" : "x86-64 baseline";
#else
  return "portable C++";
#endif
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

// The normals of the draw (seed, offset) of like.numel() elements, float32 (numel,).
// scalar=false: the vectorised generator the kernels use (also how the CPU backend materialises a
// draw the loss needs, isofast/ops/extension.py); scalar=true: philox.h's randn4 (libm), for tests.
at::Tensor philox_randn_cpu(const at::Tensor& like, int64_t seed, int64_t offset, bool scalar) {
  const int64_t numel = like.numel(), calls = (numel + 3) / 4;
  at::Tensor out = at::empty({calls * 4}, like.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  if (scalar) {
    for (int64_t k = 0; k < calls; ++k) {
      randn4(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset) + static_cast<uint64_t>(k), o + 4 * k);
    }
  } else {
    // In parallel over chunks of calls: counter-based, so the chunking does not change a value.
    constexpr int64_t kChunk = 4096;
    at::parallel_for(0, (calls + kChunk - 1) / kChunk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t c0 = chunk * kChunk, c1 = std::min(calls, c0 + kChunk);
        fill_normals(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset) + static_cast<uint64_t>(c0), c1 - c0,
                     o + 4 * c0);
      }
    });
  }
  return out.narrow(0, 0, numel);
}

// Row m of the result is philox_randn's draw (seeds[m], offsets[m]) of n elements: float32 (M, n). The
// stacked ensemble's members each draw their own key every step; one call instead of M (the Python side
// of M draws was ~3 ms of a ~33 ms step of the paper's 72 members).
at::Tensor philox_randn_rows_cpu(const at::Tensor& seeds, const at::Tensor& offsets, int64_t n) {
  constexpr const char* op = "isofast_C::philox_randn_rows";
  TORCH_CHECK(seeds.device().is_cpu() && seeds.scalar_type() == at::kLong && seeds.dim() == 1, op,
              ": seeds must be an int64 CPU vector, got ", seeds.scalar_type(), " of shape ", seeds.sizes(), " on ",
              seeds.device());
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.sizes() == seeds.sizes(), op,
              ": offsets must be an int64 CPU vector of the seeds' length (", seeds.numel(), "), got ",
              offsets.scalar_type(), " of shape ", offsets.sizes());
  TORCH_CHECK(n >= 0, op, ": n must be >= 0, got ", n);
  const at::Tensor s = seeds.contiguous(), o = offsets.contiguous();
  const int64_t rows = s.numel(), calls = (n + 3) / 4, width = calls * 4;
  at::Tensor out = at::empty({rows, width}, seeds.options().dtype(at::kFloat));
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* op_ = o.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  constexpr int64_t kChunk = 4096;  // calls per task, as philox_randn: the chunking does not change a value
  const int64_t chunks = (calls + kChunk - 1) / kChunk;
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / chunks, c0 = (task % chunks) * kChunk, c1 = std::min(calls, c0 + kChunk);
      fill_normals(static_cast<uint64_t>(sp[row]), static_cast<uint64_t>(op_[row]) + static_cast<uint64_t>(c0),
                   c1 - c0, dst + row * width + 4 * c0);
    }
  });
  return out.narrow(1, 0, n);
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) {
  m.impl("philox_bits", &philox_bits_cpu);
  m.impl("philox_randn", &philox_randn_cpu);
  m.impl("philox_randn_rows", &philox_randn_rows_cpu);
}

}  // namespace isofast::cpu
