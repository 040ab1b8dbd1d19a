// A dense layer C = act(A W^T + b) on a block of rows, for the sampling forward of the stacked ensemble
// (ensemble_mlp.cpp), with AVX-512 register tiles over a packed weight (packed once per member and thread: every
// block of the member's rows reuses it).
//
// Why not sgemm: the sampler's hidden layers are (252 x 128) x (128 x 128) per block, where MKL's sgemm ran at
// 137 GFLOP/s on one core of the 2-core VM with the bias fill and the ReLU as separate passes, against a
// measured FMA peak of 215 (a register-only FMA loop: 2 x 16 lanes x 2 flops at ~3.35 GHz). These tiles keep
// 6 rows x 64 columns of C in 24 registers for the whole k loop, start from the bias and apply the ReLU before
// the one store: 180-185 GFLOP/s on the same block, 84-86% of the peak (a C++ microbenchmark of this header,
// one thread, 2026-12-01; the same k loop alone, all in L1, reaches 187).
//
// Each element is b[j] + sum over k ascending of A[r,k] W[j,k], by fused multiply-adds: float32-accurate, not
// sgemm's order bit for bit (the sampler's outputs equal each member's model to rounding, not bitwise).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define ISOFAST_DENSE_AVX512 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

// g++ 12's AVX-512 intrinsics (casts, shuffles, max) fill their pass-through operand with a self-initialised
// placeholder, which -Wmaybe-uninitialized reports at every inlining: a false positive, silenced here only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace isofast::cpu::dense {

constexpr int64_t kLanes = 16;                // floats per zmm register
constexpr int64_t kPanel = 4 * kLanes;        // output columns per panel: 4 registers wide
constexpr int64_t kTileRows = 6;              // rows per tile: 6 x 4 accumulators + 4 weight registers

inline int64_t panels(int64_t out) { return (out + kPanel - 1) / kPanel; }

// Floats of a packed layer: per panel its kPanel biases, then in rows of kPanel weights (zero-padded).
inline int64_t packed_floats(int64_t in, int64_t out) { return panels(out) * kPanel * (in + 1); }

// Packs W (out x in, an nn.Linear weight) and b (out) for dense_rows: panel p holds b[p*kPanel ..] then, for
// every k, W[p*kPanel + c, k] for c < kPanel; columns past out are zero.
inline void pack(const float* W, const float* b, int64_t in, int64_t out, float* dst) {
  std::fill(dst, dst + packed_floats(in, out), 0.0f);
  for (int64_t p = 0; p < panels(out); ++p) {
    float* panel = dst + p * kPanel * (in + 1);
    const int64_t cols = std::min(kPanel, out - p * kPanel);
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t j = p * kPanel + c;
      panel[c] = b[j];
      for (int64_t k = 0; k < in; ++k) panel[kPanel * (k + 1) + c] = W[j * in + k];
    }
  }
}

// R rows x NV registers of C: bias, the k loop of FMAs, the ReLU (max(0, v) keeps NaN, as torch.relu), the store
// (the last register masked to the panel's width).
template <int R, int NV>
__attribute__((target("avx512f"))) inline void tile(const float* A, int64_t lda, const float* panel, int64_t K,
                                                     bool relu, __mmask16 last, float* C, int64_t ldc) {
  __m512 acc[R][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m512 bias = _mm512_loadu_ps(panel + v * kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc[r][v] = bias;
  }
  const float* w = panel + kPanel;
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    __m512 wk[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wk[v] = _mm512_loadu_ps(w + k * kPanel + v * kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, wk[v], acc[r][v]);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 o = relu ? _mm512_max_ps(zero, acc[r][v]) : acc[r][v];
      if (v == NV - 1) {
        _mm512_mask_storeu_ps(C + r * ldc + v * kLanes, last, o);
      } else {
        _mm512_storeu_ps(C + r * ldc + v * kLanes, o);
      }
    }
  }
}

// Every row of one panel: kTileRows-row tiles, then the remaining rows in one smaller tile.
template <int NV>
__attribute__((target("avx512f"))) void panel_rows(const float* A, int64_t rows, int64_t K, const float* panel,
                                                   bool relu, __mmask16 last, float* C, int64_t ldc) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows) {
    tile<kTileRows, NV>(A + r * K, K, panel, K, relu, last, C + r * ldc, ldc);
  }
  const float* a = A + r * K;
  float* c = C + r * ldc;
  switch (rows - r) {
    case 5: tile<5, NV>(a, K, panel, K, relu, last, c, ldc); break;
    case 4: tile<4, NV>(a, K, panel, K, relu, last, c, ldc); break;
    case 3: tile<3, NV>(a, K, panel, K, relu, last, c, ldc); break;
    case 2: tile<2, NV>(a, K, panel, K, relu, last, c, ldc); break;
    case 1: tile<1, NV>(a, K, panel, K, relu, last, c, ldc); break;
    default: break;
  }
}

// C (rows x out, row-major) = A (rows x in) W^T + b, ReLU'd if relu, with W and b packed by pack(). Panel-major:
// a panel's weights (in x 64 floats, 32 KB at in = 128) stay in L1 while the block's rows stream past them.
__attribute__((target("avx512f"))) inline void dense_rows(const float* A, int64_t rows, int64_t in, int64_t out,
                                                          const float* packed, bool relu, float* C) {
  for (int64_t p = 0; p < panels(out); ++p) {
    const float* panel = packed + p * kPanel * (in + 1);
    const int64_t cols = std::min(kPanel, out - p * kPanel);
    const int64_t nv = (cols + kLanes - 1) / kLanes;
    const auto last = static_cast<__mmask16>((1u << (cols - (nv - 1) * kLanes)) - 1u);
    float* c = C + p * kPanel;
    switch (nv) {
      case 4: panel_rows<4>(A, rows, in, panel, relu, last, c, out); break;
      case 3: panel_rows<3>(A, rows, in, panel, relu, last, c, out); break;
      case 2: panel_rows<2>(A, rows, in, panel, relu, last, c, out); break;
      default: panel_rows<1>(A, rows, in, panel, relu, last, c, out); break;
    }
  }
}

// C (rows x out) = relu(A (rows x IN) W^T + b) for a layer with few inputs (the 2-D data's first layer), from
// its packed weight: a panel's bias and IN weight rows stay in registers over all rows, and each row costs IN
// broadcasts and IN fused multiply-adds per register (a register tile would reload them for every 6 rows).
template <int IN>
__attribute__((target("avx512f"))) void narrow_in_rows_n(const float* A, int64_t rows, int64_t out,
                                                         const float* packed, bool relu, float* C) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t p = 0; p < panels(out); ++p) {
    const float* panel = packed + p * kPanel * (IN + 1);
    const int64_t cols = std::min(kPanel, out - p * kPanel);
    __m512 bias[4], w[IN][4];
    __mmask16 mask[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t lanes = std::clamp<int64_t>(cols - v * kLanes, 0, kLanes);
      mask[v] = static_cast<__mmask16>((1u << lanes) - 1u);
      bias[v] = _mm512_loadu_ps(panel + v * kLanes);
      for (int k = 0; k < IN; ++k) w[k][v] = _mm512_loadu_ps(panel + kPanel * (k + 1) + v * kLanes);
    }
    for (int64_t r = 0; r < rows; ++r) {
      __m512 a[IN];
      for (int k = 0; k < IN; ++k) a[k] = _mm512_set1_ps(A[r * IN + k]);
      for (int v = 0; v < 4; ++v) {
        __m512 o = bias[v];
        for (int k = 0; k < IN; ++k) o = _mm512_fmadd_ps(a[k], w[k][v], o);
        if (relu) o = _mm512_max_ps(zero, o);
        _mm512_mask_storeu_ps(C + r * out + p * kPanel + v * kLanes, mask[v], o);
      }
    }
  }
}

constexpr int64_t kNarrowIn = 4;  // the widest input narrow_in_rows takes

// narrow_in_rows_n for in <= kNarrowIn.
__attribute__((target("avx512f"))) inline void narrow_in_rows(const float* A, int64_t rows, int64_t in, int64_t out,
                                                              const float* packed, bool relu, float* C) {
  switch (in) {
    case 4: narrow_in_rows_n<4>(A, rows, out, packed, relu, C); break;
    case 3: narrow_in_rows_n<3>(A, rows, out, packed, relu, C); break;
    case 2: narrow_in_rows_n<2>(A, rows, out, packed, relu, C); break;
    default: narrow_in_rows_n<1>(A, rows, out, packed, relu, C); break;
  }
}

// The sum of v's 16 lanes: halves, then quarters, then within 128 bits.
__attribute__((target("avx512f"))) inline float lane_sum(__m512 v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  __m128 x = _mm512_castps512_ps128(v);
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// C (rows x OUT) = A (rows x in) W^T + b for a layer with few outputs (the 2-D output layer): per row, OUT dot
// products of the row with W's rows in kLanes partial sums, reduced at the end (a register tile would leave 14 of
// 16 lanes idle).
template <int OUT>
__attribute__((target("avx512f"))) void narrow_out_rows_n(const float* A, int64_t rows, int64_t in, const float* W,
                                                          const float* b, float* C) {
  const int64_t full = in / kLanes;
  const auto tail = static_cast<__mmask16>((1u << (in - full * kLanes)) - 1u);
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = A + r * in;
    __m512 acc[OUT];
    for (int c = 0; c < OUT; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t v = 0; v < full; ++v) {
      const __m512 av = _mm512_loadu_ps(a + v * kLanes);
      for (int c = 0; c < OUT; ++c) acc[c] = _mm512_fmadd_ps(av, _mm512_loadu_ps(W + c * in + v * kLanes), acc[c]);
    }
    if (tail != 0) {
      const __m512 av = _mm512_maskz_loadu_ps(tail, a + full * kLanes);
      for (int c = 0; c < OUT; ++c) {
        acc[c] = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(tail, W + c * in + full * kLanes), acc[c]);
      }
    }
    for (int c = 0; c < OUT; ++c) C[r * OUT + c] = b[c] + lane_sum(acc[c]);
  }
}

constexpr int64_t kNarrowOut = 4;  // the widest output narrow_out_rows takes

// narrow_out_rows_n for out <= kNarrowOut (no ReLU: a narrow layer is the network's output).
__attribute__((target("avx512f"))) inline void narrow_out_rows(const float* A, int64_t rows, int64_t in, int64_t out,
                                                               const float* W, const float* b, float* C) {
  switch (out) {
    case 4: narrow_out_rows_n<4>(A, rows, in, W, b, C); break;
    case 3: narrow_out_rows_n<3>(A, rows, in, W, b, C); break;
    case 2: narrow_out_rows_n<2>(A, rows, in, W, b, C); break;
    default: narrow_out_rows_n<1>(A, rows, in, W, b, C); break;
  }
}

}  // namespace isofast::cpu::dense

#pragma GCC diagnostic pop

#endif  // __x86_64__ && __GNUC__
