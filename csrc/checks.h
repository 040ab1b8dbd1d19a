// Argument checks shared by the CPU and CUDA implementations of the isofast_C ops.
//
// The Python layer (isofast.ops) validates first and raises ValueError/TypeError; these checks
// are the last line of defence for direct torch.ops.isofast_C calls, so that a wrong dtype,
// device or shape gives a clear RuntimeError instead of a crash or a wrong number.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "step_coefficients.h"

namespace isofast {

inline bool is_data_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf;
}

// float64 tables for float64 data, float32 tables otherwise (the primitive contract, ARCHITECTURE.md).
inline at::ScalarType table_dtype(at::ScalarType data) { return data == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_data(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(is_data_dtype(x.scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be a 2-D (B, n) tensor, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
}

// y on x's device, of x's shape, contiguous (any dtype).
inline void check_placed_like(const at::Tensor& y, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(y.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", y.device());
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": ", name, " must have shape ", x.sizes(), ", got ", y.sizes());
  TORCH_CHECK(y.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_like(const at::Tensor& y, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ", x.scalar_type(),
              " like the data, got ", y.scalar_type());
  check_placed_like(y, x, op, name);
}

inline void check_index(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), op, ": ", name, " must have shape (", x.size(0),
              ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// A coefficient tensor: `dim`-D, of the table dtype of the data, on the data device.
inline void check_table(const at::Tensor& c, const at::Tensor& x, int64_t dim, const char* op, const char* name) {
  const auto want = table_dtype(x.scalar_type());
  TORCH_CHECK(c.scalar_type() == want, op, ": ", name, " must be ", want, " for ", x.scalar_type(),
              " data, got ", c.scalar_type());
  TORCH_CHECK(c.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", c.device());
  TORCH_CHECK(c.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", c.sizes());
  TORCH_CHECK(c.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(c.numel() > 0, op, ": ", name, " must not be empty");
}

// Operands of q_sample / q_sample_noise (e: explicit noise or none), shared by CPU and CUDA.
inline void check_q_sample_args(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                                const at::Tensor& sqrt_1mab, const std::optional<at::Tensor>& e, const char* op) {
  check_data(x0, op, "x0");
  check_index(t, x0, op, "t");
  check_table(sqrt_ab, x0, 1, op, "sqrt_ab");
  check_table(sqrt_1mab, x0, 1, op, "sqrt_1mab");
  TORCH_CHECK(sqrt_ab.numel() == sqrt_1mab.numel(), op, ": sqrt_ab and sqrt_1mab must have the same length");
  if (e.has_value()) check_like(*e, x0, op, "e");
}

// True for a float32 noise tensor beside 16-bit data: the CPU backend's stored draw, which keeps
// the generator's float32 values instead of rounding them to the data dtype (cpu/iso_loss.cpp).
inline bool is_float32_noise_for(const at::Tensor& e, const at::Tensor& p) {
  return e.scalar_type() == at::kFloat && (p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf);
}

// Operands of iso_sums / iso_grad, shared by the CPU and CUDA implementations. e has p's dtype;
// with float32_noise_ok (CPU) it may also be float32 beside 16-bit p. x0 (like p) and coef (5, B)
// in the table dtype: both or neither (v- and x0-prediction; neither: eps-prediction).
inline void check_iso_sums_args(const at::Tensor& p, const std::optional<at::Tensor>& e,
                                const std::optional<at::Tensor>& x0, const std::optional<at::Tensor>& coef,
                                const char* op, bool float32_noise_ok = false) {
  check_data(p, op, "p");
  if (e.has_value()) {
    if (float32_noise_ok && is_float32_noise_for(*e, p)) {
      check_placed_like(*e, p, op, "e");
    } else {
      check_like(*e, p, op, "e");
    }
  }
  TORCH_CHECK(x0.has_value() == coef.has_value(), op,
              ": x0 and coef come together (v- and x0-prediction) or not at all (eps-prediction)");
  if (!coef.has_value()) return;
  check_like(*x0, p, op, "x0");
  check_table(*coef, p, 2, op, "coef");
  TORCH_CHECK(coef->size(0) == 5 && coef->size(1) == p.size(0), op, ": coef must have shape (5, ", p.size(0),
              "), got ", coef->sizes());
}

inline void check_iso_grad_args(const at::Tensor& p, const std::optional<at::Tensor>& e, const at::Tensor& c1,
                                const at::Tensor& c2, const std::optional<at::Tensor>& x0,
                                const std::optional<at::Tensor>& coef, const char* op, bool float32_noise_ok = false) {
  check_iso_sums_args(p, e, x0, coef, op, float32_noise_ok);
  check_table(c1, p, 1, op, "c1");
  check_table(c2, p, 1, op, "c2");
  TORCH_CHECK(c1.numel() == p.size(0) && c2.numel() == p.size(0), op, ": c1 and c2 must have shape (", p.size(0),
              ",), got ", c1.sizes(), " and ", c2.sizes());
}

inline void check_key(const std::optional<at::Tensor>& maybe_key, const std::optional<at::Tensor>& e,
                      const at::Tensor& x, const char* op) {
  if (e.has_value() && !maybe_key.has_value()) return;  // explicit noise: no key needed
  TORCH_CHECK(maybe_key.has_value(), op, ": key (the int64 (2,) tensor (seed, offset)) is required when e is None");
  const at::Tensor& key = *maybe_key;
  TORCH_CHECK(key.scalar_type() == at::kLong, op, ": key must be int64, got ", key.scalar_type());
  TORCH_CHECK(key.device() == x.device(), op, ": key must be on ", x.device(), ", got ", key.device());
  TORCH_CHECK(key.dim() == 1 && key.numel() == 2 && key.is_contiguous(), op,
              ": key must be a contiguous int64 tensor of shape (2,) = (seed, offset), got shape ", key.sizes());
}


// Operands of ddpm_step / ddim_step, shared by the CPU and CUDA implementations (the step indices
// are bounds-checked separately: on the host by the CPU op, in the kernel on CUDA).
inline void check_step_args(const at::Tensor& x, const at::Tensor& eps_pred, const at::Tensor& t,
                            const std::optional<at::Tensor>& e, const std::optional<at::Tensor>& key, const char* op) {
  check_data(x, op, "x");
  check_like(eps_pred, x, op, "eps_pred");
  check_index(t, x, op, "t");
  if (e.has_value()) check_like(*e, x, op, "e");
  check_key(key, e, x, op);
}

// table: the (5, T) DDPM or (6, T) DDIM coefficient rows of step_coefficients.h.
inline void check_ddpm_step_args(const at::Tensor& x, const at::Tensor& eps_pred, const at::Tensor& t,
                                 const at::Tensor& table, const std::optional<at::Tensor>& e,
                                 const std::optional<at::Tensor>& key, const char* op) {
  check_step_args(x, eps_pred, t, e, key, op);
  check_table(table, x, 2, op, "table");
  TORCH_CHECK(table.size(0) == 5, op, ": table must have shape (5, T), got ", table.sizes());
}

inline void check_ddim_step_args(const at::Tensor& x, const at::Tensor& eps_pred, const at::Tensor& t,
                                 const at::Tensor& t_prev, const at::Tensor& table,
                                 const std::optional<at::Tensor>& e, const std::optional<at::Tensor>& key,
                                 const char* op) {
  check_step_args(x, eps_pred, t, e, key, op);
  check_index(t_prev, x, op, "t_prev");
  check_table(table, x, 2, op, "table");
  TORCH_CHECK(table.size(0) == kDdimRows, op, ": table must have shape (", kDdimRows, ", T), got ", table.sizes());
}

}  // namespace isofast
