// The ensemble's per-member gradient norms as torch.linalg.vector_norm sums them (aten_norm.h), one call for a list
// of stacked gradients: out[m][i] is the norm of grads[i][m]. The ensemble's training step computes the same
// norms itself while each member's gradients are in cache; this op is how isofast checks, once per process on
// random data, which lane count agrees with torch here (isofast/ensemble.py: _verified_norm_lanes).
#include "aten_norm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

namespace isofast::cpu {
namespace {

// (M, k) float32: out[m][i] = the 2-norm of grads[i][m], each grads[i] a float32 CPU tensor (M, ...) whose
// per-member length is a multiple of lanes (8 or 16).
at::Tensor member_grad_norms_cpu(at::TensorList grads, int64_t lanes) {
  constexpr const char* op = "isofast_C::member_grad_norms";
  TORCH_CHECK(!grads.empty(), op, ": grads must hold at least one tensor");
  TORCH_CHECK(lanes == 8 || lanes == 16, op, ": lanes must be 8 or 16, got ", lanes);
  const int64_t M = grads[0].dim() > 0 ? grads[0].size(0) : 0;
  std::vector<at::Tensor> g;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& t = grads[i];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() > 0 && t.size(0) == M && M > 0 &&
                    (t.numel() / M) % lanes == 0,
                op, ": grads[", i, "] must be a float32 CPU tensor (M, ...) with the M = ", M,
                " members of grads[0] and a per-member length that is a multiple of ", lanes, ", got ",
                t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
    g.push_back(t.contiguous());
  }
  const int64_t k = static_cast<int64_t>(g.size());
  at::Tensor out = at::empty({M, k}, grads[0].options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t i = 0; i < k; ++i) {
        const int64_t n = g[i].numel() / M;
        o[m * k + i] = aten_norm2(g[i].data_ptr<float>() + m * n, n, lanes);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(isofast_C, CPU, m) { m.impl("member_grad_norms", &member_grad_norms_cpu); }

}  // namespace isofast::cpu
