"""Iso-Diffusion loss primitives: per-row sums (forward) and the gradient (backward).

Shapes: ``p`` (eps_pred) and ``e`` (explicit noise) contiguous (B, n) of one dtype
(float32, bfloat16, float16); ``c1``, ``c2`` float32 (B,). With ``e is None`` the
noise is regenerated in registers by the contract (element ``b*n + j`` of the draw
keyed by ``(seed, offset)``), bit for bit the draw ``q_sample`` used.

    iso_sums:  sse[b] = sum_j (p[b,j] - eps[b,j])**2,  ssq[b] = sum_j p[b,j]**2   (float32 (B,))
    iso_grad:  g[b,j] = c1[b] * (p[b,j] - eps[b,j]) + c2[b] * p[b,j]            (p's dtype)

With ``x0`` (B, n) and ``coef`` float32 (5, B) (v- and x0-prediction; the constexpr ``AFFINE``, so
the eps kernels stay as they were) the residual r = p - (coef0 eps + coef1 x0) and the implied eps
h = coef2 p + coef3 eps + coef4 x0 take the places of p - eps and p: sse = sum r**2, ssq = sum h**2,
g = c1 r + c2 coef2 h; x0 is one more read per pass.

Every loss mode and reduction is a choice of ``c1``, ``c2`` made by the ops layer
from ``sse``, ``ssq``, the weights and ``grad_output``, all O(B) device tensors,
so no host synchronisation is needed (e.g. mode "batch", mean: ``c1 = 2 w_b go /
(B n)``, ``c2 = 4 lambda go (S - 1) / (B n)`` with ``S = (1/B) sum_b ssq_b / n``).

Bytes through memory (``elem`` = bytes per element of ``p``; O(B) terms omitted):

    noise as a key:        forward reads p once (B n elem); backward reads p again
                           and writes g (2 B n elem): 3 B n elem in all.
    noise as a tensor:     forward reads p and e (2 B n elem); backward reads both
                           and writes g (3 B n elem): 5 B n elem in all.

The floor is 2 B n elem with a key (read p, write g): a Liger-style kernel that
writes the gradient during the forward reaches it in mode "sample", but must
store a B x n gradient between forward and backward and, for grad_output != 1,
rescale it (another read and write). The chosen split, sums in forward and
gradient in backward, saves nothing of size B x n beyond ``p`` (already alive as
the model output), folds ``grad_output`` into ``c1``/``c2``, serves mode "batch"
(whose gradient needs the batch-wide sum of ``ssq`` before any element of ``g``)
with the same two kernels, and its second read of ``p`` usually hits L2 when the
loss backward runs right after the forward at moderate sizes.

Reduction scheme of ``iso_sums``: a 1-D grid of ``B * nwin`` programs, each one
row window (see :mod:`isofast.kernels.settings`) writing its two float32 partial
sums into two (B, nwin) buffers, then ``torch.sum`` over windows (skipped when
a row fits one window): deterministic (no atomics), bit-identical between runs.
Accumulation is float32 whatever the input dtype; float64 data raises TypeError
(the ops layer sends it to the reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from isofast.kernels.launch import keyed_noise, launch_keyed, prepare_rows
from isofast.kernels.philox import row_window
from isofast.kernels.settings import check_rows


@triton.jit
def affine_terms(p, eps, x0_ptr, coef_ptr, batch, b, flat, mask):
    """(residual, implied eps, coef2) of a row window of v- or x0-prediction: coef (5, B) column b."""
    x0 = tl.load(x0_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    tgt_eps = tl.load(coef_ptr + b).to(tl.float32)
    tgt_x0 = tl.load(coef_ptr + batch + b).to(tl.float32)
    hat_p = tl.load(coef_ptr + 2 * batch + b).to(tl.float32)
    hat_eps = tl.load(coef_ptr + 3 * batch + b).to(tl.float32)
    hat_x0 = tl.load(coef_ptr + 4 * batch + b).to(tl.float32)
    return p - (tgt_eps * eps + tgt_x0 * x0), hat_p * p + hat_eps * eps + hat_x0 * x0, hat_p


@triton.jit(do_not_specialize=["batch", "seed_lo", "seed_hi", "offset_lo", "offset_hi"])
def iso_sums_kernel(p_ptr, e_ptr, x0_ptr, coef_ptr, sse_part_ptr, ssq_part_ptr, batch, n, nwin, seed_lo, seed_hi,
                    offset_lo, offset_hi, HAS_E: tl.constexpr, AFFINE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b, flat, mask, counter_index, lane = row_window(pid, n, nwin, BLOCK)
    p = tl.load(p_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    eps = keyed_noise(e_ptr, flat, mask, counter_index, lane, seed_lo, seed_hi, offset_lo, offset_hi, HAS_E)
    if AFFINE:
        diff, hat, _ = affine_terms(p, eps, x0_ptr, coef_ptr, batch, b, flat, mask)
        hat = tl.where(mask, hat, 0.0)  # generated noise outside the row enters the implied eps
    else:
        diff, hat = p - eps, p
    # Lanes outside the row carry generated noise: zero them before squaring.
    diff = tl.where(mask, diff, 0.0)
    sse = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
    ssq = tl.sum(tl.sum(hat * hat, axis=1), axis=0)
    # partials laid out (B, nwin): program pid is (b, w) = divmod(pid, nwin).
    tl.store(sse_part_ptr + pid, sse)
    tl.store(ssq_part_ptr + pid, ssq)


@triton.jit(do_not_specialize=["batch", "seed_lo", "seed_hi", "offset_lo", "offset_hi"])
def iso_grad_kernel(p_ptr, e_ptr, x0_ptr, coef_ptr, c1_ptr, c2_ptr, g_ptr, batch, n, nwin, seed_lo, seed_hi,
                    offset_lo, offset_hi, HAS_E: tl.constexpr, AFFINE: tl.constexpr, BLOCK: tl.constexpr):
    b, flat, mask, counter_index, lane = row_window(tl.program_id(0), n, nwin, BLOCK)
    c1 = tl.load(c1_ptr + b).to(tl.float32)
    c2 = tl.load(c2_ptr + b).to(tl.float32)
    p = tl.load(p_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    eps = keyed_noise(e_ptr, flat, mask, counter_index, lane, seed_lo, seed_hi, offset_lo, offset_hi, HAS_E)
    if AFFINE:
        r, hat, hat_p = affine_terms(p, eps, x0_ptr, coef_ptr, batch, b, flat, mask)
        g = c1 * r + (c2 * hat_p) * hat
    else:
        g = c1 * (p - eps) + c2 * p
    tl.store(g_ptr + flat, g.to(g_ptr.dtype.element_ty), mask=mask)


def _affine_operands(p: torch.Tensor, x0: torch.Tensor | None, coef: torch.Tensor | None):
    """(x0, coef) as the kernels read them: checked, or stand-ins (p, and p again) for eps-prediction."""
    if (x0 is None) != (coef is None):
        raise ValueError("x0 and coef come together (v- and x0-prediction) or not at all (eps-prediction)")
    if coef is None:
        return p, p
    check_rows("x0", x0, p, "eps_pred")
    if coef.dtype != torch.float32 or tuple(coef.shape) != (5, p.shape[0]) or coef.device != p.device:
        raise ValueError(f"coef must be a float32 (5, {p.shape[0]}) tensor on {p.device}, got {coef.dtype} "
                         f"{tuple(coef.shape)} on {coef.device}")
    return x0, coef.contiguous()


def iso_sums(p: torch.Tensor, e: torch.Tensor | None, seed: int, offset: int, x0: torch.Tensor | None = None,
             coef: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sse, ssq)``: float32 (B,) row sums of ``(p - eps)**2`` and ``p**2`` (with x0, coef: of r**2, h**2)."""
    cfg = prepare_rows("eps_pred", p, e)
    x0_arg, coef_arg = _affine_operands(p, x0, coef)
    batch = p.shape[0]
    if cfg is None:
        zeros = torch.zeros(batch, dtype=torch.float32, device=p.device)
        return zeros, zeros.clone()
    # two buffers, not one (2, B, nwin): the outputs must not alias (torch.library custom ops)
    sse_part = torch.empty((batch, cfg.nwin), dtype=torch.float32, device=p.device)
    ssq_part = torch.empty_like(sse_part)
    launch_keyed(iso_sums_kernel, p, cfg, (p, p if e is None else e, x0_arg, coef_arg, sse_part, ssq_part, batch),
                 e, seed, offset, AFFINE=coef is not None)
    if cfg.nwin == 1:  # one window per row: the partials are the sums, skip two launches
        return sse_part.view(batch), ssq_part.view(batch)
    return sse_part.sum(dim=1), ssq_part.sum(dim=1)


def iso_grad(p: torch.Tensor, e: torch.Tensor | None, seed: int, offset: int, c1: torch.Tensor, c2: torch.Tensor,
             x0: torch.Tensor | None = None, coef: torch.Tensor | None = None) -> torch.Tensor:
    """``g = c1[b] * (p - eps) + c2[b] * p`` (with x0, coef: ``c1 r + c2 coef2 h``): (B, n) in p's dtype."""
    cfg = prepare_rows("eps_pred", p, e)
    x0_arg, coef_arg = _affine_operands(p, x0, coef)
    g = torch.empty_like(p)
    if cfg is not None:
        # O(B) operands: .contiguous() is free when they already are (autograd may hand in
        # expanded gradients), and the kernel indexes them as dense vectors
        launch_keyed(iso_grad_kernel, p, cfg, (p, p if e is None else e, x0_arg, coef_arg, c1.contiguous(),
                                               c2.contiguous(), g, p.shape[0]),
                     e, seed, offset, AFFINE=coef is not None)
    return g
