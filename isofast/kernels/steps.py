"""One reverse-diffusion step per launch: DDPM ancestral and DDIM.

Shapes: ``x`` (x_t) and ``eps_pred`` contiguous (B, n), one dtype (float32,
bfloat16, float16); ``t``, ``t_prev`` int64 (B,); ``key`` int64 (2,) = (seed,
offset) as uint64 bit patterns, read on the device so a captured CUDA graph
replays with whatever key was copied in before each replay. Each kernel reads
``x`` and ``eps_pred`` once and writes ``x_prev`` once (3 B n elem bytes; 4 with
an explicit noise tensor ``e``); the step's coefficients are gathered by ``t[b]``
inside the kernel. Math in float32; float64 data raises TypeError (the ops layer
routes it to the reference).

    ddpm:  x0 = table[0,t] x - table[1,t] eps_pred   (clamped to [-1, 1] if clip_x0)
           x_prev = table[2,t] x0 + table[3,t] x + (t > 0) table[4,t] z
    ddim:  ab = ab[t], ab_prev = ab[t_prev] (1 where t_prev < 0), from the (6, T) table's rows
           x0 = (x - sqrt(1 - ab) eps_pred) / sqrt(ab)   (clamped if clip_x0)
           sigma = eta sqrt((1 - ab_prev) / (1 - ab) (1 - ab / ab_prev))
           x_prev = sqrt(ab_prev) x0 + sqrt(max(1 - ab_prev - sigma^2, 0)) eps_pred + sigma z

``z`` is ``e`` when given, else element ``b*n + j`` of the contract draw keyed by
``(key[0], key[1])``. DDIM with ``eta == 0`` generates no noise at all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from isofast.kernels.launch import launch_rows, prepare_rows
from isofast.kernels.philox import as_uint64, contract_normals, row_window


@triton.jit
def _step_noise(e_ptr, key_ptr, flat, mask, counter_index, lane, HAS_E: tl.constexpr):
    if HAS_E:
        z = tl.load(e_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    else:
        seed = as_uint64(tl.load(key_ptr))
        offset = as_uint64(tl.load(key_ptr + 1))
        z = contract_normals(seed, offset, counter_index, lane)
    return z


@triton.jit
def ddpm_step_kernel(x_ptr, p_ptr, t_ptr, table_ptr, e_ptr, key_ptr, out_ptr, n, nwin, T,
                     HAS_E: tl.constexpr, CLIP_X0: tl.constexpr, BLOCK: tl.constexpr):
    b, flat, mask, counter_index, lane = row_window(tl.program_id(0), n, nwin, BLOCK)
    step = tl.load(t_ptr + b)
    recip = tl.load(table_ptr + step).to(tl.float32)
    recipm1 = tl.load(table_ptr + T + step).to(tl.float32)
    coef_x0 = tl.load(table_ptr + 2 * T + step).to(tl.float32)
    coef_xt = tl.load(table_ptr + 3 * T + step).to(tl.float32)
    sigma = tl.load(table_ptr + 4 * T + step).to(tl.float32)
    sigma = tl.where(step > 0, sigma, 0.0)
    x = tl.load(x_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    x0 = recip * x - recipm1 * p
    if CLIP_X0:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    z = _step_noise(e_ptr, key_ptr, flat, mask, counter_index, lane, HAS_E)
    x_prev = coef_x0 * x0 + coef_xt * x + sigma * z
    tl.store(out_ptr + flat, x_prev.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ddim_step_kernel(x_ptr, p_ptr, t_ptr, t_prev_ptr, table_ptr, eta, e_ptr, key_ptr, out_ptr, n, nwin, T,
                     STOCHASTIC: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_E: tl.constexpr,
                     CLIP_X0: tl.constexpr, BLOCK: tl.constexpr):
    b, flat, mask, counter_index, lane = row_window(tl.program_id(0), n, nwin, BLOCK)
    step = tl.load(t_ptr + b)
    step_prev = tl.load(t_prev_ptr + b)
    last = step_prev < 0  # the jump to x_0: ab_prev = 1
    prev = tl.maximum(step_prev, 0)
    # The rows of csrc/step_coefficients.h (ddim_coef), each rounded once from float64: no coefficient
    # is rebuilt from a rounded ab. Per-row scalars, so correctly rounded sqrt/div cost nothing.
    recip = tl.load(table_ptr + step).to(tl.float32)
    recipm1 = tl.load(table_ptr + T + step).to(tl.float32)
    coef_x0 = tl.where(last, 1.0, tl.load(table_ptr + 2 * T + prev).to(tl.float32))
    x = tl.load(x_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    x0 = recip * x - recipm1 * p
    if CLIP_X0:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    if STOCHASTIC:
        ab = tl.load(table_ptr + 4 * T + step).to(tl.float32)
        om = tl.load(table_ptr + 5 * T + step).to(tl.float32)
        ab_prev = tl.where(last, 1.0, tl.load(table_ptr + 4 * T + prev).to(tl.float32))
        om_prev = tl.where(last, 0.0, tl.load(table_ptr + 5 * T + prev).to(tl.float32))
        gap = tl.where(ab_prev <= 0.5, ab_prev - ab, om - om_prev)  # ab_prev - ab from the smaller pair
        sigma = eta * tl.sqrt_rn(tl.div_rn(om_prev, om) * tl.div_rn(gap, ab_prev))
        coef_dir = tl.sqrt_rn(tl.maximum(om_prev - sigma * sigma, 0.0))
    else:
        sigma = 0.0
        coef_dir = tl.where(last, 0.0, tl.load(table_ptr + 3 * T + prev).to(tl.float32))
    x_prev = coef_x0 * x0 + coef_dir * p
    if HAS_NOISE:
        z = _step_noise(e_ptr, key_ptr, flat, mask, counter_index, lane, HAS_E)
        x_prev = x_prev + sigma * z
    tl.store(out_ptr + flat, x_prev.to(out_ptr.dtype.element_ty), mask=mask)


def _noise_args(x: torch.Tensor, t: torch.Tensor, e: torch.Tensor | None, key: torch.Tensor | None,
                needed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, key) pointers for a launch; an unused one gets a placeholder the kernel never reads
    (no allocation, so the launch stays capturable)."""
    if needed and e is None and key is None:
        raise ValueError("noise: a step needs either an explicit noise tensor e or a key tensor")
    return (x if e is None else e), (t if key is None else key.contiguous())


def ddpm_step(x: torch.Tensor, eps_pred: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
              e: torch.Tensor | None, key: torch.Tensor | None, clip_x0: bool) -> torch.Tensor:
    """x_{t-1} of the DDPM ancestral step; (B, n) in x's dtype. table: float32 (5, T)."""
    cfg = prepare_rows("x_t", x, e, ("eps_pred", eps_pred))
    out = torch.empty_like(x)
    if cfg is not None:
        launch_rows(ddpm_step_kernel, x, cfg,
                    (x, eps_pred, t.contiguous(), table.contiguous(), *_noise_args(x, t, e, key), out), table.shape[1],
                    HAS_E=e is not None, CLIP_X0=bool(clip_x0))
    return out


def ddim_step(x: torch.Tensor, eps_pred: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              table: torch.Tensor, eta: float, e: torch.Tensor | None, key: torch.Tensor | None,
              clip_x0: bool) -> torch.Tensor:
    """x_{t_prev} of the DDIM step; (B, n) in x's dtype. table: float32 (6, T) (csrc/step_coefficients.h)."""
    cfg = prepare_rows("x_t", x, e, ("eps_pred", eps_pred))
    out = torch.empty_like(x)
    if cfg is not None:
        eta = float(eta)
        # explicit noise is added even at eta = 0 (as 0 * e): the compiled kernels and the reference do too
        has_noise = eta != 0.0 or e is not None
        launch_rows(ddim_step_kernel, x, cfg,
                    (x, eps_pred, t.contiguous(), t_prev.contiguous(), table.contiguous(), eta,
                     *_noise_args(x, t, e, key, has_noise), out), table.shape[1],
                    STOCHASTIC=eta != 0.0, HAS_NOISE=has_noise, HAS_E=e is not None, CLIP_X0=bool(clip_x0))
    return out
