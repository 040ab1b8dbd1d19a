"""Forward noising ``x_t = sqrt(ab[t]) x0 + sqrt(1 - ab[t]) eps`` in one pass.

Shapes: ``x0`` contiguous (B, n) float32/bfloat16/float16; ``t`` int64 (B,);
``sqrt_ab``, ``sqrt_1mab`` float32 (T,) tables on the same device. The kernel
gathers each row's two coefficients by ``t[b]`` itself, reads ``x0`` once and
writes ``x_t`` once; with ``e is None`` the noise is generated in registers by the
contract (element ``b*n + j`` of the draw keyed by ``(seed, offset)``) and never
touches memory: 2 * B * n * elem bytes. With an explicit ``e`` it is read too
(3 * B * n * elem). Math in float32, ``x_t`` in the data dtype. float64 data is
not a Triton target (TypeError): the ops layer routes it to the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from isofast.kernels.launch import keyed_noise, launch_keyed, prepare_rows
from isofast.kernels.philox import row_window


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset_lo", "offset_hi"])
def q_sample_kernel(x0_ptr, t_ptr, sqrt_ab_ptr, sqrt_1mab_ptr, e_ptr, out_ptr, n, nwin, seed_lo, seed_hi, offset_lo, offset_hi,
                    HAS_E: tl.constexpr, BLOCK: tl.constexpr):
    b, flat, mask, counter_index, lane = row_window(tl.program_id(0), n, nwin, BLOCK)
    step = tl.load(t_ptr + b)
    coef_x = tl.load(sqrt_ab_ptr + step).to(tl.float32)
    coef_e = tl.load(sqrt_1mab_ptr + step).to(tl.float32)
    x0 = tl.load(x0_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    eps = keyed_noise(e_ptr, flat, mask, counter_index, lane, seed_lo, seed_hi, offset_lo, offset_hi, HAS_E)
    x_t = coef_x * x0 + coef_e * eps
    tl.store(out_ptr + flat, x_t.to(out_ptr.dtype.element_ty), mask=mask)


def q_sample(x0: torch.Tensor, t: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor,
             e: torch.Tensor | None, seed: int, offset: int) -> torch.Tensor:
    """``x_t[b] = sqrt_ab[t[b]] * x0[b] + sqrt_1mab[t[b]] * eps[b]``; (B, n) in x0's dtype."""
    cfg = prepare_rows("x0", x0, e)
    out = torch.empty_like(x0)
    if cfg is not None:
        launch_keyed(q_sample_kernel, x0, cfg,
                     (x0, t.contiguous(), sqrt_ab.contiguous(), sqrt_1mab.contiguous(), x0 if e is None else e, out),
                     e, seed, offset)
    return out
