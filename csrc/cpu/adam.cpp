// Adam for the stacked ensemble (isofast/ensemble_adam.py) in one pass over the parameters instead of
// torch's ~10 per tensor: the ensemble's optimizer step was half its training step on a CPU, and at the
// paper's batch of 64 it is memory-bound (every parameter's p, g, m, v and EMA cross memory once).
//
// The arithmetic is torch.optim.Adam's (the per-tensor CPU path, weight decay 0, no amsgrad) element by
// element, in float32 and in the same order, so that a member of the ensemble stays bitwise the single
// run that torch's Adam trains (tests/test_ensemble_adam.py checks every element against torch):
//   g' = g * scale[member]      (the member's gradient-clipping coefficient, optional)
//   m  = lerp(m, g', 1 - beta1)  (ATen's lerp: one fma, by the weight's branch)
//   v  = fma((1 - beta2) * g', g', v * beta2)          (mul_ then addcmul_)
//   s  = sqrt(v)                 (torch's own sqrt, at::sqrt_out on a cache-sized chunk: torch's float
//                                 sqrt is not always the correctly rounded one, and a bitwise match needs
//                                 its values; v = 0 is not passed to it, see sqrt_input)
//   p  = p + (-step_size * m) / (s / bc2_sqrt + eps)   (div, add_, addcdiv_)
//   e  = lerp(e, p, ema_weight)  (the EMA, optional: torch._foreach_lerp_)
// Each chunk of kChunk elements goes through the three steps while it is in cache. Every scalar is
// rounded to float32 as ATen rounds a Python float for a float32 tensor. Elements are independent: the
// result does not depend on the number of threads. Every operand is checked before the first write: a
// refused call changes nothing.
//
// Subnormals: a parameter whose gradient stays 0 (a dead ReLU unit) has its first moment decay by beta1 per
// step into the subnormal range (|m| < 1.2e-38, after ~800 steps), where every x86 operation on it takes a
// microcode assist: in the paper's 2-D sweep (72 members) ~2 million such moments made this kernel 2.7x
// slower after 10,000 steps. The kernel therefore runs with flush-to-zero and denormals-are-zero set (and
// restored after): a moment (or gradient) torch would keep subnormal is 0 here. Torch's Adam and this one
// then differ only in those moments; the parameter update they feed, step_size * m / (sqrt(v)/bc2 + eps),
// is below 1.2e-32 in magnitude for lr <= 1e-2 and eps = 1e-8, so it leaves any float32 parameter with
// |p| > 1e-24 unchanged: the weights stay bitwise torch's.
#include "cpu_common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sqrt.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace isofast::cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;
// Elements per chunk: its sqrt buffer (256 KB) and the just-written v stay in L2; at::sqrt_out's dispatch (a
// few microseconds) is paid once per chunk. Measured on the 2-core VM (2 MB L2 per core), Adam of the paper
// sweep's 72 members: 6.9 ms at 2^13, 6.2 at 2^15, 4.7-4.9 at 2^16, 5.2 at 2^17.
constexpr int64_t kChunk = 1 << 16;

// Flush-to-zero and denormals-are-zero on this thread while it lives (see the header); the previous mode
// is restored, so the caller's threads keep torch's IEEE behaviour.
class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtz | kDaz); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtz = 0x8000, kDaz = 0x0040;
  unsigned saved_;
#endif
};

// ATen's lerp (aten/src/ATen/native/cpu/Lerp.h): self + w (end - self) for |w| < 0.5, else
// end - (1 - w)(end - self), each one fused multiply-add. The branch is the weight's, the same for
// every element: the kernels take it as a template argument so that their loops vectorise.
template <bool kSmall>
inline float lerp(float self, float end, float w) {
  return kSmall ? std::fma(w, end - self, self) : std::fma(w - 1.0f, end - self, end);
}

template <bool kSmall>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void moments_kernel(const float* __restrict g, float* __restrict m, float* __restrict v, int64_t n, float scale,
                    float w1, float b2, float c2) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * scale;  // scale 1 when not clipping: exact
    m[i] = lerp<kSmall>(m[i], gi, w1);
    v[i] = std::fma(c2 * gi, gi, v[i] * b2);
  }
}

// The sqrt's input: v with its zeros replaced by 1. Torch's float sqrt (MKL's) takes a slow path for every
// vector that holds a zero, ~5x slower on the paper sweep's late state, where the second moments of dead
// units (gradient 0 for good) have decayed to exactly 0: 18% of them after 74,000 steps. sqrt(0) is 0 in
// any implementation, so update_kernel uses 0 where v is 0 and the sqrt's value elsewhere: the same numbers.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void sqrt_input(const float* __restrict v, float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = v[i] == 0.0f ? 1.0f : v[i];
}

template <bool kSmall>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void update_kernel(float* __restrict p, const float* __restrict m, const float* __restrict v,
                   const float* __restrict s, float* __restrict e, int64_t n, float neg_step, float bc2_sqrt,
                   float eps, float ew) {
  for (int64_t i = 0; i < n; ++i) {
    const float denom = (v[i] == 0.0f ? 0.0f : s[i]) / bc2_sqrt + eps;
    p[i] = p[i] + (neg_step * m[i]) / denom;
  }
  if (e != nullptr) {
    for (int64_t i = 0; i < n; ++i) e[i] = lerp<kSmall>(e[i], p[i], ew);
  }
}

// body(c0, c1) over [0, n) in parallel, in chunks of at most kChunk elements that may span members: the
// sqrt does not depend on the member, and per-member chunks made ~800 sqrt dispatches per step of the
// paper's 72 members (their biases are 128 elements each).
template <typename Body>
void for_each_chunk(int64_t n, Body&& body) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; c += kChunk) body(c, std::min(end, c + kChunk));
  });
}

void check_list(const at::TensorList& list, const at::TensorList& like, const char* name, const char* op) {
  TORCH_CHECK(list.size() == like.size(), op, ": ", name, " must have one tensor per parameter (", like.size(),
              "), got ", list.size());
  for (size_t k = 0; k < list.size(); ++k) {
    const at::Tensor& t = list[k];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), op, ": ", name, "[", k,
                "] must be a contiguous float32 CPU tensor, got ", t.scalar_type(), " on ", t.device(),
                t.is_contiguous() ? "" : " (not contiguous)");
    TORCH_CHECK(t.numel() == like[k].numel(), op, ": ", name, "[", k, "] has ", t.numel(), " elements, its parameter ",
                like[k].numel());
  }
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList ema, const std::optional<at::Tensor>& scale, double beta1, double beta2,
                   double step_size, double bc2_sqrt, double eps, double ema_weight) {
  constexpr const char* op = "isofast_C::adam_step_";
  check_list(params, params, "params", op);
  check_list(grads, params, "grads", op);
  check_list(exp_avgs, params, "exp_avgs", op);
  check_list(exp_avg_sqs, params, "exp_avg_sqs", op);
  TORCH_CHECK(ema.empty() || ema.size() == params.size(), op, ": ema must be empty or hold one tensor per parameter");
  if (!ema.empty()) check_list(ema, params, "ema", op);
  const float* sc = nullptr;
  int64_t members = 1;
  if (scale.has_value()) {
    TORCH_CHECK(scale->device().is_cpu() && scale->scalar_type() == at::kFloat && scale->dim() == 1 &&
                    scale->is_contiguous(),
                op, ": scale must be a contiguous float32 CPU vector (one value per member)");
    sc = scale->data_ptr<float>();
    members = scale->numel();
    for (size_t k = 0; k < params.size(); ++k) {
      TORCH_CHECK(params[k].dim() >= 1 && params[k].size(0) == members, op, ": params[", k,
                  "] must have the members (", members, ") as its first dimension");
    }
  }
  const float w1 = static_cast<float>(1.0 - beta1), b2 = static_cast<float>(beta2),
              c2 = static_cast<float>(1.0 - beta2), neg_step = static_cast<float>(-step_size),
              bs = static_cast<float>(bc2_sqrt), ep = static_cast<float>(eps), ew = static_cast<float>(ema_weight);
  const bool small1 = std::abs(w1) < 0.5f, small_e = std::abs(ew) < 0.5f;
  for (size_t k = 0; k < params.size(); ++k) {
    const int64_t n = params[k].numel();
    if (n == 0) continue;
    float* p = params[k].data_ptr<float>();
    const float* g = grads[k].data_ptr<float>();
    float* m = exp_avgs[k].data_ptr<float>();
    float* v = exp_avg_sqs[k].data_ptr<float>();
    float* e = ema.empty() ? nullptr : ema[k].data_ptr<float>();
    const int64_t per_member = n / members;
    for_each_chunk(n, [&](int64_t c0, int64_t c1) {
      const FlushSubnormals flush;
      thread_local std::vector<float> sqrt_buf;  // per thread, kept: no allocation per step
      sqrt_buf.resize(kChunk);
      // the moments per member's part of the chunk (each has its own clipping coefficient)
      for (int64_t i = c0; i < c1;) {
        const int64_t member = i / per_member, stop = std::min(c1, (member + 1) * per_member);
        const float scale_m = sc != nullptr ? sc[member] : 1.0f;
        if (small1) {
          moments_kernel<true>(g + i, m + i, v + i, stop - i, scale_m, w1, b2, c2);
        } else {
          moments_kernel<false>(g + i, m + i, v + i, stop - i, scale_m, w1, b2, c2);
        }
        i = stop;
      }
      const int64_t len = c1 - c0;
      sqrt_input(v + c0, sqrt_buf.data(), len);
      at::Tensor buf = at::from_blob(sqrt_buf.data(), {len}, at::kFloat);
      at::sqrt_out(buf, buf);
      float* ec = e != nullptr ? e + c0 : nullptr;
      if (small_e) {
        update_kernel<true>(p + c0, m + c0, v + c0, sqrt_buf.data(), ec, len, neg_step, bs, ep, ew);
      } else {
        update_kernel<false>(p + c0, m + c0, v + c0, sqrt_buf.data(), ec, len, neg_step, bs, ep, ew);
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) {
  m.impl("adam_step_", &adam_step_cpu);
}

}  // namespace isofast::cpu
