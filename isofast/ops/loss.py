"""`iso_ddpm_loss`: noise-prediction MSE plus the Iso-Diffusion isotropy penalty.

The fused backends need only two primitives, whatever the mode, weights or reduction:
``iso_sums`` reduces each sample to sse_b = sum_i (p - eps)^2 and ssq_b = sum_i p^2, and
``iso_grad`` writes g = c1_b (p - eps) + c2_b p. The loss itself is a few (B,)-sized torch ops
on the sums (`reference.loss_from_terms`, the same code as the oracle), so autograd delivers
d loss / d sse_b and d loss / d ssq_b, and the backward of ``iso_sums`` is one ``iso_grad`` pass
with c1 = 2 dL/dsse, c2 = 2 dL/dssq. The upstream gradient is folded into c1/c2 on the device,
so no host sync and no extra scaling pass.

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


def _iso_sums_setup(ctx, inputs, output):
    p, e, seed, offset, backend = inputs
    ctx.save_for_backward(p, e)
    ctx.key = (seed, offset, backend)


def _iso_sums_backward(ctx, grad_sse, grad_ssq):
    p, e = ctx.saved_tensors
    seed, offset, backend = ctx.key
    grad_p = _iso_grad_op(p, e, seed, offset, 2.0 * grad_sse, 2.0 * grad_ssq, backend)
    return grad_p, None, None, None, None


_iso_sums_op.register_autograd(_iso_sums_backward, setup_context=_iso_sums_setup)


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
        sse, ssq = _iso_sums_op(p, e, seed, offset, name)
        n = p.shape[1]
        loss, parts = reference.loss_from_terms(sse / n, ssq / n, iso_lambda, iso_mode, weights, reduction)
    return (loss, parts) if return_parts else loss
