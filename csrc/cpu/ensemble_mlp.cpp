// The stacked 2-D ensemble's TimeMLP forward and backward (isofast/ensemble_models.py) as fused CPU kernels.
//
// Every weight is stacked as its member's nn.Linear weight, (M, out, in): a layer computes b + h W^T with the
// sgemm call torch makes for nn.Linear, and a member's gradient is laid out (and reduced, in its norm) as its
// own model's.
//
// Sampling (ensemble_mlp_forward, predict_shared_t): every row of member m has one timestep, so each layer's
// time term is a per-member constant, folded by the caller into the layer's bias, and the network is
// h <- relu(h W_l[m]^T + b_l[m]) for every layer but the last (no ReLU). Torch runs that as batched matmuls
// over (M, rows, width) activations: at the sampler's 10,000 rows per member every layer's output is written
// to memory and read back twice (the bias, the ReLU), and the sampler was memory-bound at a third of the
// machine's matmul rate. Here a block of kRows rows of one member goes through every layer while its
// activations stay in L2: only x and the output cross memory, and the time is the matmuls'. On AVX-512 CPUs
// the layers run as register tiles over weights packed per member (dense_avx512.h: 36 against 50 ms per
// sampler step of 18 members x 10,000 points, ~80% of the FMA peak); elsewhere as sgemm calls and loops.
//
// Training (ensemble_mlp_train_forward / _backward, the autograd function _FusedTimeMLP): one task per
// member runs its batch through every layer and back, instead of ~40 batched ops and their autograd graph
// per step (at the paper's batch of 64 the step's time was mostly dispatch). Each sum is in the order of the
// member's own TimeMLP (nn.Linear's b + h W^T, then + the time projection; its backward's grad W and grad^T h;
// at::sum for the bias gradients),
// so that a member's output and gradients are its own model's bit for bit (tests/test_ensemble_mlp_kernel.py).
//
// The matmuls are single-threaded sgemm calls (the BLAS torch links; MKL on x86 builds) inside the parallel
// loop over tasks; where torch exports no sgemm_ they are at::mm / addmm_ on views. A task's result does not
// depend on the thread that computes it.
#include "aten_norm.h"
#include "cpu_common.h"
#include "dense_avx512.h"
#include "iso_rows.h"
#include "iso_tail.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

// LP64 Fortran BLAS; weak: a torch built without an exported BLAS still loads this library.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace isofast::cpu {
namespace {

// Rows per task of the sampling forward: two (kRows, 128) float activations are 252 KB, in L2 beside the
// 64 KB weights; a multiple of the AVX-512 tile's 6 rows.
constexpr int64_t kRows = 252;

// Row-major C (rows x cols) = op(A) op(B) + beta C, op(X) = X or X^T (A^T: A is stored (k x rows), lda its row
// length). Column-major BLAS sees the row-major C as C^T = op(B)^T op(A)^T.
void gemm(bool trans_a, bool trans_b, int64_t rows, int64_t cols, int64_t k, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C) {
  if (sgemm_ != nullptr) {
    const int m_ = static_cast<int>(cols), n_ = static_cast<int>(rows), k_ = static_cast<int>(k),
              lda_ = static_cast<int>(lda), ldb_ = static_cast<int>(ldb);
    const float one = 1.0f;
    sgemm_(trans_b ? "T" : "N", trans_a ? "T" : "N", &m_, &n_, &k_, &one, B, &ldb_, A, &lda_, &beta, C, &m_);
    return;
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = trans_a ? at::from_blob(const_cast<float*>(A), {k, rows}, {lda, 1}, f32).t()
                         : at::from_blob(const_cast<float*>(A), {rows, k}, {lda, 1}, f32);
  at::Tensor b = trans_b ? at::from_blob(const_cast<float*>(B), {cols, k}, {ldb, 1}, f32).t()
                         : at::from_blob(const_cast<float*>(B), {k, cols}, {ldb, 1}, f32);
  at::Tensor c = at::from_blob(C, {rows, cols}, f32);
  if (beta == 0.0f) {
    at::mm_out(c, a, b);
  } else {
    c.addmm_(a, b, beta);
  }
}

// Row-major C (rows x out) (+)= A (rows x in) W^T, W an nn.Linear weight (out x in): the layer's matmul.
inline void linear(int64_t rows, int64_t in, int64_t out, const float* A, const float* W, float beta, float* C) {
  gemm(false, true, rows, out, in, A, in, W, in, beta, C);
}

// Every row of dst (rows x n) = bias (n).
void fill_rows(float* dst, const float* bias, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) std::copy(bias, bias + n, dst + r * n);
}

// Layers with at most kNarrow inputs or outputs (the 2-D data's first and last layers) run as plain loops in the
// sampler: sgemm took 3.5 and 9.8 us on a 256-row block of them (37 and 13 GFLOP/s; 50 us for a 128 x 128 layer).
constexpr int64_t kNarrow = 4;

// C (rows x n) += A (rows x k) B (k x n) for small k: n-wide axpys per row.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void narrow_in_accumulate(int64_t rows, int64_t k, int64_t n, const float* __restrict A, const float* __restrict B,
                          float* __restrict C) {
  for (int64_t r = 0; r < rows; ++r) {
    float* c = C + r * n;
    for (int64_t kk = 0; kk < k; ++kk) {
      const float a = A[r * k + kk];
      const float* b = B + kk * n;
      for (int64_t j = 0; j < n; ++j) c[j] += a * b[j];
    }
  }
}

// C (rows x n) += A (rows x k) Bt^T for small n, Bt (n x k) the nn.Linear weight: k-long dot products, each
// in kLanes partial sums (independent lanes vectorise; one running sum would not).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void narrow_out_accumulate(int64_t rows, int64_t k, int64_t n, const float* __restrict A, const float* __restrict Bt,
                           float* __restrict C) {
  constexpr int64_t kLanes = 16;
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = A + r * k;
    for (int64_t j = 0; j < n; ++j) {
      const float* b = Bt + j * k;
      float acc[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= k; i += kLanes) {
        for (int64_t q = 0; q < kLanes; ++q) acc[q] += a[i + q] * b[i + q];
      }
      float sum = 0.0f;
      for (; i < k; ++i) sum += a[i] * b[i];
      for (int64_t q = 0; q < kLanes; ++q) sum += acc[q];
      C[r * n + j] += sum;
    }
  }
}

// torch.relu's values: NaN stays NaN.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void relu_inplace(float* __restrict h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = h[i] < 0.0f ? 0.0f : h[i];
}

// z = relu(z + p): the training forward's sum of the layer and the time projection, then the ReLU.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void add_relu(float* __restrict z, const float* __restrict p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = z[i] + p[i];
    z[i] = s < 0.0f ? 0.0f : s;
  }
}

// delta = 0 where the ReLU's output h <= 0 (torch's threshold_backward).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void relu_backward(float* __restrict delta, const float* __restrict h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) delta[i] = h[i] <= 0.0f ? 0.0f : delta[i];
}

// out (n) = the sum of the rows of g (rows x n), by at::sum: its vectorised cascade's order, so that a member's
// bias gradient is its own model's (autograd's sum over the batch) bit for bit.
void sum_rows(const float* g, int64_t rows, int64_t n, float* out) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor o = at::from_blob(out, {n}, f32);
  at::sum_out(o, at::from_blob(const_cast<float*>(g), {rows, n}, f32), 0);
}

// A stacked parameter (d0, d1, d2) (d1 < 0: any width, "out"), named name[index] (index < 0: name alone).
void check_stack(const at::Tensor& t, const char* op, const char* name, int64_t index, int64_t d0, int64_t d1,
                 int64_t d2) {
  const std::string label = index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 3 && t.size(0) == d0 &&
                  (d1 < 0 || t.size(1) == d1) && t.size(2) == d2,
              op, ": ", label, " must be a float32 CPU tensor (", d0, ", ",
              d1 < 0 ? std::string("out") : std::to_string(d1), ", ", d2, "), got ", t.scalar_type(), " of shape ",
              t.sizes(), " on ", t.device());
  TORCH_CHECK(t.size(1) > 0 && t.size(2) > 0 && t.size(1) <= INT32_MAX && t.size(2) <= INT32_MAX, op, ": ", label,
              " has a width of 0 or one too large for a 32-bit BLAS: ", t.sizes());
}

// A float buffer of at least `floats`, 64-byte aligned (every weight load of a packed panel is then one cache
// line), kept by the calling thread across calls: allocating the multi-MB scratch of a sampler step anew costs a
// page fault per 4 KB (glibc maps large blocks afresh), ~2% of the step.
float* thread_scratch(int64_t floats) {
  struct Buffer {
    float* data = nullptr;
    int64_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  if (buffer.size < floats) {
    std::free(buffer.data);
    const size_t bytes = (static_cast<size_t>(floats) * sizeof(float) + 63) / 64 * 64;
    buffer.data = static_cast<float*>(std::aligned_alloc(64, bytes));
    buffer.size = buffer.data == nullptr ? 0 : floats;
    TORCH_CHECK(buffer.data != nullptr, "isofast_C::ensemble_mlp_forward: out of memory for ", bytes,
                " bytes of scratch");
  }
  return buffer.data;
}

// Member m's layers that run from a packed weight (packed_at[l] >= 0: their offset in dst), packed for
// dense_avx512.h.
void pack_member(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& b,
                 const std::vector<int64_t>& packed_at, int64_t m, int64_t d, float* dst) {
#ifdef ISOFAST_DENSE_AVX512
  for (int64_t l = 0, in = d; l < static_cast<int64_t>(w.size()); in = w[l].size(1), ++l) {
    const int64_t out = w[l].size(1);
    if (packed_at[l] >= 0) {
      dense::pack(w[l].data_ptr<float>() + m * in * out, b[l].data_ptr<float>() + m * out, in, out,
                  dst + packed_at[l]);
    }
  }
#endif
  (void)w, (void)b, (void)packed_at, (void)m, (void)d, (void)dst;
}

// One layer of the sampling forward on AVX-512 (dense_avx512.h): from its packed weight where it has one, or as
// dot products where it is the narrow output layer. False where it does not apply (then the caller runs the
// portable path: sgemm and loops).
bool avx512_layer(const float* h, int64_t rows, int64_t in, int64_t out, const float* W, const float* bias,
                  const float* packed, bool last, float* dst) {
#ifdef ISOFAST_DENSE_AVX512
  if (packed != nullptr && in <= dense::kNarrowIn) {
    dense::narrow_in_rows(h, rows, in, out, packed, !last, dst);
    return true;
  }
  if (packed != nullptr) {
    dense::dense_rows(h, rows, in, out, packed, !last, dst);
    return true;
  }
  if (use_avx512() && last && out <= dense::kNarrowOut) {
    dense::narrow_out_rows(h, rows, in, out, W, bias, dst);
    return true;
  }
#endif
  (void)h, (void)rows, (void)in, (void)out, (void)W, (void)bias, (void)packed, (void)last, (void)dst;
  return false;
}

at::Tensor ensemble_mlp_forward_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases) {
  constexpr const char* op = "isofast_C::ensemble_mlp_forward";
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3, op,
              ": x must be a float32 CPU tensor (M, N, d), got ", x.scalar_type(), " of shape ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(!weights.empty() && weights.size() == biases.size(), op,
              ": weights and biases must hold one tensor per layer (at least one), got ", weights.size(), " and ",
              biases.size());
  const int64_t M = x.size(0), N = x.size(1);
  int64_t width = x.size(2), widest = width;
  std::vector<at::Tensor> w, b;
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto i = static_cast<int64_t>(l);
    check_stack(weights[l], op, "weights", i, M, -1, width);
    const int64_t out = weights[l].size(1);
    check_stack(biases[l], op, "biases", i, M, 1, out);
    w.push_back(weights[l].contiguous());
    b.push_back(biases[l].contiguous());
    width = out;
    widest = std::max(widest, out);
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor result = at::empty({M, N, width}, x.options());
  if (M == 0 || N == 0) return result;
  const int64_t blocks = (N + kRows - 1) / kRows, layers = static_cast<int64_t>(w.size()), d = x.size(2);
  const float* xp = xc.data_ptr<float>();
  float* outp = result.data_ptr<float>();
  // Layers with more than kNarrow outputs run as AVX-512 register tiles where the CPU has them, from the
  // member's weight and bias packed once per task range and member (64 KB of a 128 x 128 layer; each of the
  // member's blocks reuses them).
  std::vector<int64_t> packed_at(static_cast<size_t>(layers), -1);
  int64_t packed_per_member = 0;
#ifdef ISOFAST_DENSE_AVX512
  if (use_avx512()) {
    for (int64_t l = 0, in = d; l < layers; in = w[l].size(1), ++l) {
      const int64_t out = w[l].size(1);
      if (out > kNarrow) {
        packed_at[l] = packed_per_member;
        packed_per_member += dense::packed_floats(in, out);
      }
    }
  }
#endif
  const int64_t act_floats = 2 * kRows * widest;  // a block's activations, ping-pong
  at::parallel_for(0, M * blocks, 1, [&](int64_t begin, int64_t end) {
    float* scratch = thread_scratch(packed_per_member + act_floats + kNarrow * widest);
    float* packed = scratch;  // the current member's packed layers
    float* buf = scratch + packed_per_member;
    float* transposed = buf + act_floats;  // a narrow-input layer's weight, transposed (in x out)
    int64_t packed_member = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m = task / blocks, r0 = (task % blocks) * kRows, rows = std::min(kRows, N - r0);
      if (packed_per_member > 0 && m != packed_member) {
        pack_member(w, b, packed_at, m, d, packed);
        packed_member = m;
      }
      const float* h = xp + (m * N + r0) * d;
      int64_t in = d;
      for (int64_t l = 0; l < layers; ++l) {
        const int64_t out = w[l].size(1);
        const bool last = l == layers - 1;
        float* dst = last ? outp + (m * N + r0) * width : buf + (l % 2) * kRows * widest;
        const float* wm = w[l].data_ptr<float>() + m * in * out;
        const float* bm = b[l].data_ptr<float>() + m * out;
        const float* pm = packed_at[l] < 0 ? nullptr : packed + packed_at[l];
        if (!avx512_layer(h, rows, in, out, wm, bm, pm, last, dst)) {
          fill_rows(dst, bm, rows, out);
          if (in <= kNarrow) {
            for (int64_t i = 0; i < in; ++i) {
              for (int64_t j = 0; j < out; ++j) transposed[i * out + j] = wm[j * in + i];
            }
            narrow_in_accumulate(rows, in, out, h, transposed, dst);
          } else if (out <= kNarrow) {
            narrow_out_accumulate(rows, in, out, h, wm, dst);
          } else {
            linear(rows, in, out, h, wm, 1.0f, dst);
          }
          if (!last) relu_inplace(dst, rows * out);
        }
        h = dst;
        in = out;
      }
    }
  });
  return result;
}

// The TimeMLP's layers as the ensemble stacks them (isofast/ensemble_models.py, EnsembleMLP), each weight its
// member's nn.Linear's (out x in): hidden layer l is relu(h weights[l]^T + biases[l] + emb projs[l]^T), the
// output layer h out_weight^T + out_bias.
struct StackedMLP {
  std::vector<at::Tensor> weights, projs, biases;
  at::Tensor out_weight;
  int64_t data_dim, emb_dim, widest;

  StackedMLP(const char* op, int64_t M, int64_t d, int64_t E, at::TensorList w, at::TensorList p,
             at::TensorList b, const at::Tensor& ow)
      : data_dim(d), emb_dim(E), widest(d) {
    TORCH_CHECK(!w.empty() && w.size() == p.size() && w.size() == b.size(), op,
                ": weights, projs and biases must hold one tensor per hidden layer (at least one), got ", w.size(),
                ", ", p.size(), " and ", b.size());
    int64_t in = d;
    for (size_t l = 0; l < w.size(); ++l) {
      const auto i = static_cast<int64_t>(l);
      check_stack(w[l], op, "weights", i, M, -1, in);
      const int64_t out = w[l].size(1);
      check_stack(p[l], op, "projs", i, M, out, E);
      check_stack(b[l], op, "biases", i, M, 1, out);
      weights.push_back(w[l].contiguous());
      projs.push_back(p[l].contiguous());
      biases.push_back(b[l].contiguous());
      widest = std::max(widest, out);
      in = out;
    }
    check_stack(ow, op, "out_weight", -1, M, d, in);
    out_weight = ow.contiguous();
  }

  int64_t layers() const { return static_cast<int64_t>(weights.size()); }
  int64_t in_width(int64_t l) const { return l == 0 ? data_dim : weights[l - 1].size(1); }
  int64_t out_width(int64_t l) const { return weights[l].size(1); }
  const float* w(int64_t l, int64_t m) const {
    return weights[l].data_ptr<float>() + m * in_width(l) * out_width(l);
  }
  const float* p(int64_t l, int64_t m) const { return projs[l].data_ptr<float>() + m * out_width(l) * emb_dim; }
};

// The training ops' points x (M, B, d).
void check_points(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(2) > 0, op,
              ": x must be a float32 CPU tensor (M, B, d), got ", x.scalar_type(), " of shape ", x.sizes(), " on ",
              x.device());
}

void check_rows(const at::Tensor& t, const char* op, const char* name, int64_t M, int64_t B, int64_t width) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 3 && t.size(0) == M &&
                  (B < 0 || t.size(1) == B) && (width < 0 || t.size(2) == width),
              op, ": ", name, " must be a float32 CPU tensor (", M, ", ", B < 0 ? std::string("B") : std::to_string(B),
              ", ", width < 0 ? std::string("width") : std::to_string(width), "), got ", t.scalar_type(),
              " of shape ", t.sizes(), " on ", t.device());
}

// Member m's training forward of its B rows x (B x d) with embeddings e (B x E): hidden layer l's activations
// into h_out[l] (B x out_l), the output into y (B x d); proj: a B x widest scratch. Each layer adds in the
// single TimeMLP's order, relu((b + h W^T) + emb P^T), so that a member computes what its own model's
// nn.Linear layers compute.
void member_forward(const StackedMLP& net, int64_t m, int64_t B, const float* x, const float* e,
                    const std::vector<float*>& h_out, const float* out_bias, float* y, float* proj) {
  const float* h = x;
  for (int64_t l = 0; l < net.layers(); ++l) {
    const int64_t in = net.in_width(l), out = net.out_width(l);
    float* z = h_out[l];
    fill_rows(z, net.biases[l].data_ptr<float>() + m * out, B, out);
    linear(B, in, out, h, net.w(l, m), 1.0f, z);
    linear(B, net.emb_dim, out, e, net.p(l, m), 0.0f, proj);
    add_relu(z, proj, B * out);
    h = z;
  }
  const int64_t in = net.out_width(net.layers() - 1), d = net.data_dim;
  fill_rows(y, out_bias + m * d, B, d);
  linear(B, in, d, h, net.out_weight.data_ptr<float>() + m * d * in, 1.0f, y);
}

// Where member m's gradients go: the stacked gradient tensors of the parameters.
struct Grads {
  std::vector<at::Tensor> w, p, b;
  at::Tensor out_w, out_b;

  Grads(const StackedMLP& net, int64_t M) {
    for (int64_t l = 0; l < net.layers(); ++l) {
      w.push_back(at::empty_like(net.weights[l]));
      p.push_back(at::empty_like(net.projs[l]));
      b.push_back(at::empty_like(net.biases[l]));
    }
    out_w = at::empty_like(net.out_weight);
    out_b = at::empty({M, 1, net.data_dim}, net.out_weight.options());
  }
};

// Member m's backward from the output's gradient g (B x d), as nn.Linear's backward computes it: grad_W =
// delta^T h (out x in), grad_h = delta W; h_in[l] is hidden layer l's input (h_in[0] = x, h_in[L] the last
// hidden layer's output). delta, next: B x widest scratch.
void member_backward(const StackedMLP& net, int64_t m, int64_t B, const float* g, const float* e,
                     const std::vector<const float*>& h_in, Grads& grads, std::vector<float>& delta,
                     std::vector<float>& next) {
  const int64_t d = net.data_dim, E = net.emb_dim, L = net.layers(), top = net.out_width(L - 1);
  const float* h_top = h_in[L];  // the last hidden layer's output: the output layer's input
  // output layer: y = b + h W^T
  gemm(true, false, d, top, B, g, d, h_top, top, 0.0f, grads.out_w.data_ptr<float>() + m * d * top);
  sum_rows(g, B, d, grads.out_b.data_ptr<float>() + m * d);
  gemm(false, false, B, top, d, g, d, net.out_weight.data_ptr<float>() + m * d * top, top, 0.0f, delta.data());
  relu_backward(delta.data(), h_top, B * top);
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t in = net.in_width(l), out = net.out_width(l);
    const float* h = h_in[l];
    gemm(true, false, out, in, B, delta.data(), out, h, in, 0.0f, grads.w[l].data_ptr<float>() + m * out * in);
    gemm(true, false, out, E, B, delta.data(), out, e, E, 0.0f, grads.p[l].data_ptr<float>() + m * out * E);
    sum_rows(delta.data(), B, out, grads.b[l].data_ptr<float>() + m * out);
    if (l > 0) {
      gemm(false, false, B, in, out, delta.data(), out, net.w(l, m), in, 0.0f, next.data());
      relu_backward(next.data(), h, B * in);
      std::swap(delta, next);
    }
  }
}

// Training forward: every member's rows through every layer in one task per member (its activations in
// L2), the hidden activations kept for the backward.
std::tuple<at::Tensor, std::vector<at::Tensor>> ensemble_mlp_train_forward_cpu(
    const at::Tensor& x, const at::Tensor& emb, at::TensorList weights, at::TensorList projs, at::TensorList biases,
    const at::Tensor& out_weight, const at::Tensor& out_bias) {
  constexpr const char* op = "isofast_C::ensemble_mlp_train_forward";
  check_points(x, op);
  const int64_t M = x.size(0), B = x.size(1), d = x.size(2);
  check_rows(emb, op, "emb", M, B, -1);
  const StackedMLP net(op, M, d, emb.size(2), weights, projs, biases, out_weight);
  check_stack(out_bias, op, "out_bias", -1, M, 1, d);
  const at::Tensor xc = x.contiguous(), ec = emb.contiguous(), ob = out_bias.contiguous();
  std::vector<at::Tensor> hidden;
  for (int64_t l = 0; l < net.layers(); ++l) hidden.push_back(at::empty({M, B, net.out_width(l)}, x.options()));
  at::Tensor result = at::empty({M, B, d}, x.options());
  const int64_t E = net.emb_dim;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> proj(B * net.widest);
    std::vector<float*> h_out(net.layers());
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t l = 0; l < net.layers(); ++l) h_out[l] = hidden[l].data_ptr<float>() + m * B * net.out_width(l);
      member_forward(net, m, B, xc.data_ptr<float>() + m * B * d, ec.data_ptr<float>() + m * B * E, h_out,
                     ob.data_ptr<float>(), result.data_ptr<float>() + m * B * d, proj.data());
    }
  });
  return {result, hidden};
}

// Its backward: the parameters' gradients (x and emb need none), one task per member.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>
ensemble_mlp_train_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& emb,
                                at::TensorList hidden, at::TensorList weights, at::TensorList projs,
                                at::TensorList biases, const at::Tensor& out_weight) {
  constexpr const char* op = "isofast_C::ensemble_mlp_train_backward";
  check_points(x, op);
  const int64_t M = x.size(0), B = x.size(1), d = x.size(2);
  check_rows(grad, op, "grad", M, B, d);
  check_rows(emb, op, "emb", M, B, -1);
  const StackedMLP net(op, M, d, emb.size(2), weights, projs, biases, out_weight);
  TORCH_CHECK(static_cast<int64_t>(hidden.size()) == net.layers(), op, ": hidden must hold one tensor per hidden layer (",
              net.layers(), "), got ", hidden.size());
  std::vector<at::Tensor> h_saved;
  for (int64_t l = 0; l < net.layers(); ++l) {
    check_rows(hidden[l], op, "hidden", M, B, net.out_width(l));
    h_saved.push_back(hidden[l].contiguous());
  }
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), ec = emb.contiguous();
  Grads grads(net, M);
  const int64_t E = net.emb_dim, L = net.layers();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> delta(B * net.widest), next(B * net.widest);
    std::vector<const float*> h_in(L + 1);
    for (int64_t m = begin; m < end; ++m) {
      h_in[0] = xc.data_ptr<float>() + m * B * d;
      for (int64_t l = 0; l < L; ++l) h_in[l + 1] = h_saved[l].data_ptr<float>() + m * B * net.out_width(l);
      member_backward(net, m, B, gc.data_ptr<float>() + m * B * d, ec.data_ptr<float>() + m * B * E, h_in, grads,
                      delta, next);
    }
  });
  return {grads.w, grads.p, grads.b, grads.out_w, grads.out_b};
}

// x_t = sqrt_ab[t] x0 + sqrt_1mab[t] eps for one member's B rows of d, with the q_sample op's row arithmetic.
void q_sample_rows(const float* x0, const float* eps, const int64_t* t, const float* sa, const float* sb, int64_t B,
                   int64_t d, float* out) {
  for (int64_t b = 0; b < B; ++b) q_sample_row(x0 + b * d, eps + b * d, sa[t[b]], sb[t[b]], d, out + b * d);
}

// sse, ssq of one member's B rows of n (pred against eps) as the iso_sums op computes them: lane sums per
// kTile elements of the row (the op's tiling, cpu_common.h: for_each_tile; a row shorter than kTile is one
// tile), the tiles' partials added in float64.
void member_sums(const float* pred, const float* eps, int64_t B, int64_t n, float* sse, float* ssq) {
  for (int64_t b = 0; b < B; ++b) {
    double s_err = 0, s_sq = 0;
    for (int64_t j0 = 0; j0 < n; j0 += kTile) {
      float e, q;
      iso_rows::row_sums<float>(pred + b * n + j0, eps + b * n + j0, static_cast<const float*>(nullptr),
                                std::min(kTile, n - j0), iso_rows::EpsilonTerms{}, &e, &q);
      s_err += e;
      s_sq += q;
    }
    sse[b] = static_cast<float>(s_err);
    ssq[b] = static_cast<float>(s_sq);
  }
}

// The ensemble's whole training forward and backward in one task per member: q_sample, the TimeMLP, the
// Iso-Diffusion loss (eps-prediction, mode "batch", mean over the member's batch, its own lambda) and every
// parameter's gradient of the sum of the members' losses; no autograd graph, no tensor but the outputs. Each
// step is the one the separate ops take (q_sample, the training forward and backward above, iso_sums,
// iso_loss_tail with a unit upstream gradient, iso_grad), in their arithmetic and order, so that a member is
// its single run bit for bit (tests/test_ensemble.py). emb_table: the timestep embedding's rows (row t for
// timestep t); lambdas: (M,) float64. norm_lanes > 0: also each gradient's per-member 2-norm as
// torch.linalg.vector_norm sums it with that many lanes (aten_norm.h; the clipping norms, taken here while the
// member's gradients are in cache), norms[m][i] for the gradients in output order whose per-member length is a
// multiple of norm_lanes, 0 for the others (the caller takes those from torch).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
           at::Tensor, at::Tensor>
ensemble_mlp_train_step_cpu(const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& t,
                            const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab, const at::Tensor& emb_table,
                            const at::Tensor& lambdas, at::TensorList weights, at::TensorList projs,
                            at::TensorList biases, const at::Tensor& out_weight, const at::Tensor& out_bias,
                            int64_t norm_lanes) {
  constexpr const char* op = "isofast_C::ensemble_mlp_train_step";
  TORCH_CHECK(norm_lanes == 0 || norm_lanes == 8 || norm_lanes == 16, op, ": norm_lanes must be 0, 8 or 16, got ",
              norm_lanes);
  check_points(x0, op);
  const int64_t M = x0.size(0), B = x0.size(1), d = x0.size(2);
  check_rows(eps, op, "eps", M, B, d);
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 2 && t.size(0) == M && t.size(1) == B,
              op, ": t must be an int64 CPU tensor (", M, ", ", B, "), got ", t.scalar_type(), " of shape ", t.sizes(),
              " on ", t.device());
  for (const auto& [name, table] : {std::pair{"sqrt_ab", &sqrt_ab}, std::pair{"sqrt_1mab", &sqrt_1mab}}) {
    TORCH_CHECK(table->device().is_cpu() && table->scalar_type() == at::kFloat && table->dim() == 1 &&
                    table->numel() == sqrt_ab.numel(),
                op, ": ", name, " must be a float32 CPU vector (T,), of sqrt_ab's length, got ", table->scalar_type(),
                " of shape ", table->sizes());
  }
  TORCH_CHECK(emb_table.device().is_cpu() && emb_table.scalar_type() == at::kFloat && emb_table.dim() == 2, op,
              ": emb_table must be a float32 CPU tensor (rows, E), got ", emb_table.scalar_type(), " of shape ",
              emb_table.sizes());
  TORCH_CHECK(lambdas.device().is_cpu() && lambdas.scalar_type() == at::kDouble && lambdas.dim() == 1 &&
                  lambdas.size(0) == M,
              op, ": lambdas must be a float64 CPU vector (", M, ",), one per member, got ", lambdas.scalar_type(),
              " of shape ", lambdas.sizes());
  const StackedMLP net(op, M, d, emb_table.size(1), weights, projs, biases, out_weight);
  check_stack(out_bias, op, "out_bias", -1, M, 1, d);
  const at::Tensor tc = t.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  check_steps(tp, M * B, std::min(sqrt_ab.numel(), emb_table.size(0)), false, op, "t");
  const at::Tensor xc = x0.contiguous(), ec = eps.contiguous(), sa = sqrt_ab.contiguous(),
                   sb = sqrt_1mab.contiguous(), table = emb_table.contiguous(), lam = lambdas.contiguous(),
                   ob = out_bias.contiguous();
  at::Tensor loss = at::empty({M}, x0.options());
  Grads grads(net, M);
  const int64_t E = net.emb_dim, L = net.layers();
  std::vector<at::Tensor> all_grads;  // in output order: weights, projs, biases, out_weight, out_bias
  for (const auto* list : {&grads.w, &grads.p, &grads.b}) all_grads.insert(all_grads.end(), list->begin(), list->end());
  all_grads.push_back(grads.out_w);
  all_grads.push_back(grads.out_b);
  const int64_t P = static_cast<int64_t>(all_grads.size());
  at::Tensor norms = at::zeros({M, norm_lanes > 0 ? P : 0}, x0.options());
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x_t(B * d), emb(B * E), hidden(L * B * net.widest), y(B * d), g(B * d), proj(B * net.widest),
        delta(B * net.widest), next(B * net.widest), sse(B), ssq(B), k1(B), k2(B), d_w(B);
    std::vector<float*> h_out(L);
    std::vector<const float*> h_in(L + 1);
    for (int64_t l = 0; l < L; ++l) h_in[l + 1] = h_out[l] = hidden.data() + l * B * net.widest;
    h_in[0] = x_t.data();
    for (int64_t m = begin; m < end; ++m) {
      const int64_t* tm = tp + m * B;
      const float* em = ec.data_ptr<float>() + m * B * d;
      q_sample_rows(xc.data_ptr<float>() + m * B * d, em, tm, sa.data_ptr<float>(), sb.data_ptr<float>(), B, d,
                    x_t.data());
      for (int64_t b = 0; b < B; ++b) {
        const float* row = table.data_ptr<float>() + tm[b] * E;
        std::copy(row, row + E, emb.data() + b * E);
      }
      member_forward(net, m, B, x_t.data(), emb.data(), h_out, ob.data_ptr<float>(), y.data(), proj.data());
      // the loss: iso_sums, then the tail (its mse, iso and isotropy are not kept)
      member_sums(y.data(), em, B, d, sse.data(), ssq.data());
      float mse, iso, isotropy;
      iso_tail::tail_group<float>({sse.data()}, {ssq.data()}, nullptr, 0, B, 0, d, lam.data_ptr<double>()[m],
                                  /*sample=*/false, /*none=*/false, /*mean=*/true,
                                  {loss.data_ptr<float>() + m, &mse, &iso, &isotropy, k1.data(), k2.data(), d_w.data()});
      // its backward for a unit upstream gradient: the tail's autograd (dsse = k1 * 0.5 * 1), iso_sums' (c1 = 2
      // dsse), then iso_grad: exactly these float products
      for (int64_t b = 0; b < B; ++b) {
        const float c1 = 2.0f * ((k1[b] * 0.5f) * 1.0f), c2 = 2.0f * ((k2[b] * 0.5f) * 1.0f);
        iso_rows::grad_tile<float>(y.data() + b * d, em + b * d, static_cast<const float*>(nullptr), g.data() + b * d,
                                   d, c1, c2, iso_rows::EpsilonTerms{});
      }
      member_backward(net, m, B, g.data(), emb.data(), h_in, grads, delta, next);
      for (int64_t i = 0; norm_lanes > 0 && i < P; ++i) {
        const int64_t n = all_grads[i].numel() / M;
        if (n % norm_lanes == 0) {
          norms.data_ptr<float>()[m * P + i] = aten_norm2(all_grads[i].data_ptr<float>() + m * n, n, norm_lanes);
        }
      }
    }
  });
  return {loss, grads.w, grads.p, grads.b, grads.out_w, grads.out_b, norms};
}

}  // namespace

const char* sampler_isa() {
#ifdef ISOFAST_DENSE_AVX512
  if (use_avx512()) return "AVX-512";
#endif
  return "sgemm";
}

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) {
  m.impl("ensemble_mlp_forward", &ensemble_mlp_forward_cpu);
  m.impl("ensemble_mlp_train_forward", &ensemble_mlp_train_forward_cpu);
  m.impl("ensemble_mlp_train_backward", &ensemble_mlp_train_backward_cpu);
  m.impl("ensemble_mlp_train_step", &ensemble_mlp_train_step_cpu);
}

}  // namespace isofast::cpu
