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
// activations stay in L2: only x and the output cross memory, and the time is the matmuls'.
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
#include "cpu_common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

// LP64 Fortran BLAS; weak: a torch built without an exported BLAS still loads this library.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace isofast::cpu {
namespace {

// Rows per task of the sampling forward: two (kRows, 128) float activations are 256 KB, in L2 beside the
// 64 KB weight.
constexpr int64_t kRows = 256;

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
  at::parallel_for(0, M * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * kRows * widest);  // per task range: the block's activations, ping-pong
    std::vector<float> transposed(kNarrow * widest);  // a narrow-input layer's weight, transposed (in x out)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m = task / blocks, r0 = (task % blocks) * kRows, rows = std::min(kRows, N - r0);
      const float* h = xp + (m * N + r0) * d;
      int64_t in = d;
      for (int64_t l = 0; l < layers; ++l) {
        const int64_t out = w[l].size(1);
        const bool last = l == layers - 1;
        float* dst = last ? outp + (m * N + r0) * width : buf.data() + (l % 2) * kRows * widest;
        fill_rows(dst, b[l].data_ptr<float>() + m * out, rows, out);
        const float* wm = w[l].data_ptr<float>() + m * in * out;
        if (in <= kNarrow) {
          for (int64_t i = 0; i < in; ++i) {
            for (int64_t j = 0; j < out; ++j) transposed[i * out + j] = wm[j * in + i];
          }
          narrow_in_accumulate(rows, in, out, h, transposed.data(), dst);
        } else if (out <= kNarrow) {
          narrow_out_accumulate(rows, in, out, h, wm, dst);
        } else {
          linear(rows, in, out, h, wm, 1.0f, dst);
        }
        if (!last) relu_inplace(dst, rows * out);
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

// Training forward: every member's rows through every layer in one task per member (its activations in
// L2), the hidden activations kept for the backward. Each layer adds in the single TimeMLP's order,
// relu((b + h W^T) + emb P^T), so that a member computes what its own model's nn.Linear layers compute.
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
    std::vector<float> proj(B * net.widest);  // the time projection of one layer
    for (int64_t m = begin; m < end; ++m) {
      const float* h = xc.data_ptr<float>() + m * B * d;
      const float* e = ec.data_ptr<float>() + m * B * E;
      for (int64_t l = 0; l < net.layers(); ++l) {
        const int64_t in = net.in_width(l), out = net.out_width(l);
        float* z = hidden[l].data_ptr<float>() + m * B * out;
        fill_rows(z, net.biases[l].data_ptr<float>() + m * out, B, out);
        linear(B, in, out, h, net.w(l, m), 1.0f, z);
        linear(B, E, out, e, net.p(l, m), 0.0f, proj.data());
        add_relu(z, proj.data(), B * out);
        h = z;
      }
      const int64_t in = net.out_width(net.layers() - 1);
      float* y = result.data_ptr<float>() + m * B * d;
      fill_rows(y, ob.data_ptr<float>() + m * d, B, d);
      linear(B, in, d, h, net.out_weight.data_ptr<float>() + m * d * in, 1.0f, y);
    }
  });
  return {result, hidden};
}

// Its backward: the parameters' gradients (x and emb need none), one task per member, as nn.Linear's backward
// computes them: grad_W = delta^T h (out x in), grad_h = delta W.
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
  std::vector<at::Tensor> h_saved, gw, gp, gb;
  for (int64_t l = 0; l < net.layers(); ++l) {
    check_rows(hidden[l], op, "hidden", M, B, net.out_width(l));
    h_saved.push_back(hidden[l].contiguous());
    gw.push_back(at::empty_like(net.weights[l]));
    gp.push_back(at::empty_like(net.projs[l]));
    gb.push_back(at::empty_like(net.biases[l]));
  }
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), ec = emb.contiguous();
  at::Tensor g_out_w = at::empty_like(net.out_weight), g_out_b = at::empty({M, 1, d}, x.options());
  const int64_t E = net.emb_dim, L = net.layers();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> delta(B * net.widest), next(B * net.widest);
    for (int64_t m = begin; m < end; ++m) {
      const float* g = gc.data_ptr<float>() + m * B * d;
      const float* e = ec.data_ptr<float>() + m * B * E;
      auto h_of = [&](int64_t l) {  // the input of layer l (l = L: the output layer)
        return l == 0 ? xc.data_ptr<float>() + m * B * d : h_saved[l - 1].data_ptr<float>() + m * B * net.out_width(l - 1);
      };
      const int64_t top = net.out_width(L - 1);
      const float* h_top = h_of(L);  // the last hidden layer's output: the output layer's input
      // output layer: y = b + h W^T
      gemm(true, false, d, top, B, g, d, h_top, top, 0.0f, g_out_w.data_ptr<float>() + m * d * top);
      sum_rows(g, B, d, g_out_b.data_ptr<float>() + m * d);
      gemm(false, false, B, top, d, g, d, net.out_weight.data_ptr<float>() + m * d * top, top, 0.0f, delta.data());
      relu_backward(delta.data(), h_top, B * top);
      for (int64_t l = L - 1; l >= 0; --l) {
        const int64_t in = net.in_width(l), out = net.out_width(l);
        const float* h = h_of(l);
        gemm(true, false, out, in, B, delta.data(), out, h, in, 0.0f, gw[l].data_ptr<float>() + m * out * in);
        gemm(true, false, out, E, B, delta.data(), out, e, E, 0.0f, gp[l].data_ptr<float>() + m * out * E);
        sum_rows(delta.data(), B, out, gb[l].data_ptr<float>() + m * out);
        if (l > 0) {
          gemm(false, false, B, in, out, delta.data(), out, net.w(l, m), in, 0.0f, next.data());
          relu_backward(next.data(), h, B * in);
          std::swap(delta, next);
        }
      }
    }
  });
  return {gw, gp, gb, g_out_w, g_out_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) {
  m.impl("ensemble_mlp_forward", &ensemble_mlp_forward_cpu);
  m.impl("ensemble_mlp_train_forward", &ensemble_mlp_train_forward_cpu);
  m.impl("ensemble_mlp_train_backward", &ensemble_mlp_train_backward_cpu);
}

}  // namespace isofast::cpu
