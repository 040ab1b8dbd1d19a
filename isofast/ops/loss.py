"""`iso_ddpm_loss`: noise-prediction MSE plus the Iso-Diffusion isotropy penalty.

The fused backends need only two primitives, whatever the mode, weights or reduction:
``iso_sums`` reduces each sample to sse_b = sum_i (p - eps)^2 and ssq_b = sum_i p^2, and
``iso_grad`` writes g = c1_b (p - eps) + c2_b p. The loss is a few (B,)-sized torch ops on the
sums (`reference.loss_from_terms`, the same code as the oracle; on the CPU one compiled op that
the tests hold to it). Its slopes dL/dmse_b and dL/ds_b have a closed form (`_slopes`), so the
forward computes them too and the backward is one ``iso_grad`` pass with c1 = (2/n) dL/dmse_b,
c2 = (2/n) dL/ds_b times the upstream gradient, folded on the device: no host sync, no extra
scaling pass, and no autograd graph over the small ops (recording and replaying it cost ~200 us
per step on the CPU, more than both kernels).

Memory traffic (B x n elements of e bytes): forward reads eps_pred once (plus eps if given as a
tensor); backward reads eps_pred again (usually from L2: it runs right after the forward) and
writes the gradient once: 3 B n e bytes with a NoiseKey, 5 B n e with an explicit eps tensor.
Autograd saves eps_pred (a reference, no copy; plus eps if explicit) and nothing else of size B x n.
Mode "sample" could skip the second read by writing the gradient in the forward (Liger-Kernel
style), but then backward must rescale it by grad_output: one more read+write pass, or a host
sync to test grad_output == 1; the two-primitive scheme is cheaper on both counts.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import reference
from ..noise import NoiseKey, to_signed
from ..reference import LossParts
from . import backends, dispatch, validation


@torch.library.custom_op("isofast::iso_sums", mutates_args=())
def _iso_sums_op(
    p: torch.Tensor, e: torch.Tensor | None, seed: int, offset: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.kernels(backend).iso_sums(p, e, seed, offset)


@_iso_sums_op.register_fake
def _(p, e, seed, offset, backend):
    acc = reference.compute_dtype(p.dtype)
    return p.new_empty(p.shape[0], dtype=acc), p.new_empty(p.shape[0], dtype=acc)


@torch.library.custom_op("isofast::iso_grad", mutates_args=())
def _iso_grad_op(
    p: torch.Tensor, e: torch.Tensor | None, seed: int, offset: int, c1: torch.Tensor, c2: torch.Tensor, backend: str
) -> torch.Tensor:
    return backends.kernels(backend).iso_grad(p, e, seed, offset, c1, c2)


@_iso_grad_op.register_fake
def _(p, e, seed, offset, c1, c2, backend):
    return torch.empty_like(p)


def _slopes(mse_b, s_b, iso_lambda, iso_mode, weights, reduction):
    """(dL/dmse_b, dL/ds_b, dL/dw_b) of `reference.loss_from_terms`, each (B,).

    With r = 1/B for reduction "mean", else 1, and S = (1/B) sum_b s_b:
    batch: dL/dmse_b = r w_b, dL/ds_b = 2 lambda (S - 1) / B, dL/dw_b = r mse_b;
    sample: dL/dmse_b = r w_b, dL/ds_b = 2 lambda r w_b (s_b - 1), dL/dw_b = r (mse_b + lambda (s_b - 1)^2).
    For reduction "none" these are the derivatives of each sample's own term (r = 1).
    """
    B = s_b.shape[0]
    r = 1.0 / B if reduction == "mean" else 1.0
    w = torch.ones_like(s_b) if weights is None else weights.to(s_b.dtype)
    if iso_mode == "batch":
        d_s = ((2.0 * iso_lambda / B) * (s_b.mean() - 1.0)).expand(B)
        d_w = r * mse_b
    else:
        d_s = (2.0 * iso_lambda * r) * w * (s_b - 1.0)
        d_w = r * (mse_b + iso_lambda * (s_b - 1.0) ** 2)
    return r * w, d_s, d_w


def _tail(sse, ssq, n, weights, iso_lambda, iso_mode, reduction):
    """(loss, mse, iso, isotropy, k1, k2, d_w) from the sums: the loss, its detached parts, the
    ``iso_grad`` coefficients k1 = (2/n) dL/dmse_b, k2 = (2/n) dL/ds_b and dL/dw_b.

    On the CPU one compiled op (``isofast_C::iso_loss_tail``, when the extension is built);
    elsewhere the torch ops of the oracle (a GPU launches them asynchronously, no host sync).
    """
    if sse.device.type == "cpu" and backends.usable("cpu"):
        w = None if weights is None else weights.to(sse.dtype).contiguous()
        return torch.ops.isofast_C.iso_loss_tail(sse, ssq, n, w, iso_lambda, iso_mode, reduction)
    mse_b, s_b = sse / n, ssq / n
    loss, parts = reference.loss_from_terms(mse_b, s_b, iso_lambda, iso_mode, weights, reduction)
    d_mse, d_s, d_w = _slopes(mse_b, s_b, iso_lambda, iso_mode, weights, reduction)
    return (loss, *parts, (2.0 / n) * d_mse, ((2.0 / n) * d_s).contiguous(), d_w)


class _IsoLoss(torch.autograd.Function):
    """Loss (and its detached parts) from the fused sums; backward is one ``iso_grad`` pass."""

    @staticmethod
    def forward(ctx, p, e, weights, seed, offset, iso_lambda, iso_mode, reduction, backend):
        sse, ssq = dispatch.run(_iso_sums_op, backend, "iso_sums", p, e, seed, offset)
        loss, mse, iso, isotropy, k1, k2, d_w = _tail(sse, ssq, p.shape[1], weights, iso_lambda, iso_mode, reduction)
        ctx.save_for_backward(p, e, k1, k2, d_w if ctx.needs_input_grad[2] else None)
        ctx.key = (seed, offset, backend)
        ctx.mark_non_differentiable(mse, iso, isotropy)
        return loss, mse, iso, isotropy

    @staticmethod
    @once_differentiable  # iso_grad has no derivative of its own: no double backward through the loss
    def backward(ctx, grad_loss, *_):
        p, e, k1, k2, d_w = ctx.saved_tensors
        seed, offset, backend = ctx.key
        grad_p = grad_w = None
        if ctx.needs_input_grad[0]:
            # Scalar loss: grad_loss is 0-dim; reduction "none": (B,), one upstream gradient per sample.
            c1, c2 = k1 * grad_loss, k2 * grad_loss
            grad_p = dispatch.run(_iso_grad_op, backend, "iso_grad", p, e, seed, offset, c1, c2)
        if d_w is not None:
            grad_w = d_w * grad_loss
        return grad_p, None, grad_w, None, None, None, None, None, None


def iso_ddpm_loss(
    eps_pred: torch.Tensor,
    noise: torch.Tensor | NoiseKey,
    iso_lambda: float = 0.3,
    iso_mode: str = "batch",
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    return_parts: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, LossParts]:
    """The Iso-Diffusion loss of ``eps_pred`` (B, ...) against the true noise (a NoiseKey or tensor).

    With mse_b = mean_i (eps_pred - eps)^2 and s_b = mean_i eps_pred^2 per sample:
    mode "batch": mean_b(w_b mse_b) + iso_lambda ((1/B) sum_b s_b - 1)^2;
    mode "sample": mean_b(w_b (mse_b + iso_lambda (s_b - 1)^2)).
    reduction "sum" sums over b instead of averaging; "none" (mode "sample" only) returns the
    (B,) per-sample terms. ``weights`` (B,) default to 1 (e.g. min-SNR-gamma). Accumulation is in
    float32 (float64 for float64 input); the loss has that dtype. NaN in eps_pred gives a NaN loss:
    nothing is masked. ``return_parts=True`` also returns the detached `LossParts` at no extra pass.
    """
    eps_pred = validation.float_tensor("eps_pred", eps_pred)
    noise = validation.noise_for(noise, eps_pred)
    iso_lambda = validation.iso_lambda(iso_lambda)
    iso_mode = validation.choice("iso_mode", iso_mode, validation.ISO_MODES)
    reduction = validation.choice("reduction", reduction, validation.REDUCTIONS)
    if reduction == "none" and iso_mode == "batch":
        raise ValueError('reduction="none" needs iso_mode="sample": the batch penalty is not a per-sample term')
    weights = validation.weights(weights, eps_pred.shape[0], eps_pred.device)

    name = dispatch.choose(backend, eps_pred)
    eps_tensor = noise if isinstance(noise, torch.Tensor) else None
    if name == "reference" or dispatch.needs_reference_autograd(eps_tensor):
        eps = noise.materialize(torch.float32) if isinstance(noise, NoiseKey) else noise
        loss, parts = reference.iso_ddpm_loss(eps_pred, eps, iso_lambda, iso_mode, weights, reduction)
    else:
        if isinstance(noise, NoiseKey):
            e, seed, offset = None, to_signed(noise.seed), to_signed(noise.offset)
        else:
            e, seed, offset = dispatch.rows(noise.to(eps_pred.dtype)), 0, 0
        p = dispatch.rows(eps_pred)
        loss, *terms = _IsoLoss.apply(p, e, weights, seed, offset, iso_lambda, iso_mode, reduction, name)
        parts = LossParts(*terms)
    return (loss, parts) if return_parts else loss
