"""`iso_ddpm_loss`: noise-prediction MSE plus the Iso-Diffusion isotropy penalty.

Two primitives serve every mode, weighting and reduction: ``iso_sums(p, e, seed, offset)`` reduces
each sample to sse_b = sum_i (p - eps)^2 and ssq_b = sum_i p^2, and its autograd is the other,
``iso_grad``, which writes g = c1_b (p - eps) + c2_b p with c1 = 2 dL/dsse_b, c2 = 2 dL/dssq_b.
Between them is the loss's O(B) tail (`_tail`): the oracle's formula (`reference.loss_from_terms`)
and its closed-form slopes, so the backward is one ``iso_grad`` pass and no autograd graph over
~20 tiny ops. On the CPU the tail is one compiled op (``isofast_C::iso_loss_tail``, for one group or an
ensemble's G: in torch ops it costs more than both kernels at training sizes); elsewhere `_LossTail`
below, in torch ops.

Prediction types: for v- and x0-prediction the same two primitives take two more operands, x0 and
per-row coefficients coef (5, B) (`operands.PREDICTION_COEFFICIENTS`), since the residual against the
target and the implied eps are affine in (pred, eps, x0) per row: r = pred - (coef0 eps + coef1 x0),
eps_hat = coef2 pred + coef3 eps + coef4 x0; then sse_b = sum r^2, ssq_b = sum eps_hat^2 and the
gradient is c1 r + c2 coef2 eps_hat. Still one pass each, with the noise regenerated; x0 is one more
read per pass (5 B n e bytes with a key). eps-prediction passes neither and runs the kernels it ran before.

Memory traffic (B x n elements of e bytes): forward reads eps_pred once (plus eps if given as a
tensor); backward reads eps_pred again (usually from L2: it runs right after the forward) and
writes the gradient once: 3 B n e bytes with a NoiseKey, 5 B n e with an explicit eps tensor.
Autograd saves eps_pred (a reference, no copy; plus eps if explicit or kept) and nothing else of
size B x n. Mode "sample" could skip the second read by writing the gradient in the forward
(Liger-Kernel style), but then backward must rescale it by grad_output: one more read+write pass,
or a host sync to test grad_output == 1; the two-primitive scheme is cheaper on both counts.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import reference
from ..noise import NoiseKey
from ..reference import LossParts
from ..schedule import NoiseSchedule
from . import backends, extension, operands, prediction, validation

ONCE_DIFFERENTIABLE = ("iso_ddpm_loss: the fused loss is differentiable once (its backward, iso_grad, has no "
                       "derivative); for higher-order gradients (create_graph=True) use backend='reference'")


def iso_ddpm_loss(
    eps_pred: torch.Tensor,
    noise: torch.Tensor | NoiseKey,
    iso_lambda: float = 0.3,
    iso_mode: str = "batch",
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    return_parts: bool = False,
    backend: str | None = None,
    groups: int = 1,
    *,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
    x0: torch.Tensor | None = None,
    t: torch.Tensor | int | None = None,
    schedule: NoiseSchedule | None = None,
) -> torch.Tensor | tuple[torch.Tensor, LossParts]:
    """The Iso-Diffusion loss of the model output ``eps_pred`` (B, ...) against the true noise (a NoiseKey or tensor).

    ``prediction_type``: what the model predicts, "epsilon" (the default), "v_prediction" or "sample"
    (x0), as diffusers names them. For v and x0 the target is built from x0, the noise and ab_t, and
    the isotropy penalty applies to the eps the prediction implies (x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps):
    v: target sqrt(ab_t) eps - sqrt(1 - ab_t) x0, eps_hat = sqrt(ab_t) v_hat + sqrt(1 - ab_t) x_t;
    sample: target x0, eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t). Near t = 0 that eps_hat
    multiplies the error of x0_hat by sqrt(ab_t / (1 - ab_t)) (100 at t = 0 of the linear schedule),
    and the penalty's gradient by its square: lower ``iso_lambda`` or weight with ``snr_gamma`` there.
    ``snr_gamma``: min-SNR-gamma weights, snr = ab_t / (1 - ab_t): min(snr, gamma) / snr (epsilon),
    min(snr, gamma) / (snr + 1) (v_prediction), min(snr, gamma) (sample), multiplied into ``weights``.
    The context these need (x0, t, the schedule) comes with the `NoiseKey` that `q_sample` returned;
    for a noise tensor (or to override the key's) pass ``x0=`` (B, ...) like eps_pred, ``t=`` (B,)
    (or an int) and ``schedule=``. A missing piece is a ValueError naming it. x0 is read in eps_pred's
    dtype; gradients flow into eps_pred (and weights), and into an x0 that requires grad (reference path).

    With mse_b = mean_i (eps_pred - target)^2 and s_b = mean_i eps_hat^2 per sample (eps-prediction:
    target eps, eps_hat = eps_pred):
    mode "batch": mean_b(w_b mse_b) + iso_lambda ((1/B) sum_b s_b - 1)^2;
    mode "sample": mean_b(w_b (mse_b + iso_lambda (s_b - 1)^2)).
    reduction "sum" sums over b instead of averaging; "none" (mode "sample" only) returns the
    (B,) per-sample terms. ``weights`` (B,) default to 1 (e.g. min-SNR-gamma). Accumulation is in
    float32 (float64 for float64 input); the loss has that dtype. NaN in eps_pred gives a NaN loss:
    nothing is masked. ``return_parts=True`` also returns the detached `LossParts` at no extra pass.

    ``groups`` G > 1 (an ensemble of G models in one batch): the batch is G consecutive groups of B/G
    samples, each a loss of its own (its own batch penalty, its own lambda: ``iso_lambda`` a float or a
    (G,) tensor); the loss and its parts are (G,) tensors, equal to G separate calls (reduction "none":
    the (B,) per-sample terms). Still one pass of the kernels over the whole batch.
    """
    eps_pred = validation.float_tensor("eps_pred", eps_pred)
    noise = validation.noise_for(noise, eps_pred)
    groups = validation.groups(groups, eps_pred.shape[0])
    iso_lambda = validation.iso_lambda(iso_lambda, groups, eps_pred.device)
    iso_mode = validation.choice("iso_mode", iso_mode, validation.ISO_MODES)
    reduction = validation.choice("reduction", reduction, validation.REDUCTIONS)
    if reduction == "none" and iso_mode == "batch":
        raise ValueError('reduction="none" needs iso_mode="sample": the batch penalty is not a per-sample term')
    weights = validation.weights(weights, eps_pred.shape[0], eps_pred.device)
    return_parts = validation.flag("return_parts", return_parts)
    prediction_type = validation.choice("prediction_type", prediction_type, reference.PREDICTION_TYPES)
    if snr_gamma is not None:
        snr_gamma = validation.positive_finite("snr_gamma", snr_gamma)
    ctx = prediction.loss_context(noise, eps_pred, prediction_type, snr_gamma, x0, t, schedule)

    name = backends.resolve(backend, eps_pred.device, eps_pred.dtype)
    if name == "reference" or operands.needs_reference_autograd(
            noise if isinstance(noise, torch.Tensor) else None, ctx.x0):
        eps = noise.materialize(torch.float32) if isinstance(noise, NoiseKey) else noise
        loss, parts = reference.iso_ddpm_loss(eps_pred, eps, iso_lambda, iso_mode, weights, reduction, groups,
                                              prediction_type=prediction_type, x0=ctx.x0, t=ctx.t,
                                              sched=ctx.schedule, snr_gamma=snr_gamma)
        return (loss, parts) if return_parts else loss
    if snr_gamma is not None:
        snr_w = reference.min_snr_weights(operands.table(ctx.schedule, "snr", eps_pred)[0][ctx.t], snr_gamma, prediction_type)
        weights = snr_w if weights is None else weights * snr_w.to(weights.dtype)
    p = operands.rows(eps_pred)
    keeps = name in backends.KEEPS_DRAW
    e, seed, offset = operands.noise(noise, p, use_kept=keeps)
    if e is None and keeps and not torch.compiler.is_compiling():
        e = extension.draw(p, seed, offset)  # the loss on its own: draw once, for iso_sums and iso_grad
    affine = () if ctx.x0 is None else (  # v- and x0-prediction: the x0 operand and the rows' coefficients
        operands.rows(ctx.x0.to(p.dtype)), operands.prediction_coefficients(ctx.schedule, prediction_type, ctx.t, p))
    sse, ssq = backends.library(name).iso_sums(p, e, seed, offset, *affine)
    loss, *terms = _tail(sse, ssq, p.shape[1], weights, iso_lambda, iso_mode, reduction, groups)[:4]
    return (loss, LossParts(*terms)) if return_parts else loss


def _tail(sse, ssq, n, weights, iso_lambda, iso_mode, reduction, groups=1):
    """(loss, mse, iso, isotropy, k1, k2, d_w) from the sums, differentiable in sse, ssq and weights.

    k1 = (2/n) dL/dmse_b, k2 = (2/n) dL/ds_b and d_w = dL/dw_b are the slopes for a unit upstream
    gradient (``iso_grad``'s coefficients are k1 g and k2 g). On the CPU one compiled op with its
    autograd in C++ (groups: one lambda per group, float64 as `_LossTail` converts it); elsewhere
    `_LossTail` (a GPU launches its small ops asynchronously, no host sync). Both compute in float64
    and return the sums' dtype.
    """
    w = None if weights is None else weights.to(sse.dtype).contiguous()
    if sse.device.type == "cpu" and backends.usable("cpu"):
        if groups == 1:
            return torch.ops.isofast_C.iso_loss_tail(sse, ssq, n, w, iso_lambda, iso_mode, reduction)
        lambdas = (iso_lambda if isinstance(iso_lambda, torch.Tensor)
                   else torch.full((groups,), float(iso_lambda), dtype=torch.float64))
        return torch.ops.isofast_C.iso_loss_tail(sse, ssq, n, w, 0.0, iso_mode, reduction, lambdas)
    return _LossTail.apply(sse, ssq, n, w, iso_lambda, iso_mode, reduction, groups)


def _slopes(mse_b, s_b, iso_lambda, iso_mode, weights, reduction):
    """(dL/dmse_b, dL/ds_b, dL/dw_b) of `reference.loss_from_terms`, each of the terms' shape.

    Over the last dimension (B samples; leading group dimensions allowed, ``iso_lambda`` a float or
    one value per group). With r = 1/B for reduction "mean", else 1, and S = (1/B) sum_b s_b:
    batch: dL/dmse_b = r w_b, dL/ds_b = 2 lambda (S - 1) / B, dL/dw_b = r mse_b;
    sample: dL/dmse_b = r w_b, dL/ds_b = 2 lambda r w_b (s_b - 1), dL/dw_b = r (mse_b + lambda (s_b - 1)^2).
    For reduction "none" these are the derivatives of each sample's own term (r = 1).
    """
    B = s_b.shape[-1]
    r = 1.0 / B if reduction == "mean" else 1.0
    w = torch.ones_like(s_b) if weights is None else weights.to(s_b.dtype)
    lam = iso_lambda.to(s_b.dtype).unsqueeze(-1) if isinstance(iso_lambda, torch.Tensor) else iso_lambda
    if iso_mode == "batch":
        d_s = ((2.0 * lam / B) * (s_b.mean(dim=-1, keepdim=True) - 1.0)).expand_as(s_b)
        d_w = r * mse_b
    else:
        d_s = (2.0 * lam * r) * w * (s_b - 1.0)
        d_w = r * (mse_b + lam * (s_b - 1.0) ** 2)
    return r * w, d_s, d_w


class _LossTail(torch.autograd.Function):
    """The tail in torch ops, in float64 like its twin csrc/cpu/iso_loss_tail.cpp (the tests hold them
    together); with ``groups`` G, over (G, B/G) sums: G losses of their own."""

    @staticmethod
    def forward(ctx, sse, ssq, n, weights, iso_lambda, iso_mode, reduction, groups):
        acc = torch.float64
        mse_b, s_b = (sse.to(acc) / n).view(groups, -1), (ssq.to(acc) / n).view(groups, -1)
        w = None if weights is None else weights.to(acc).view(groups, -1)
        lam = iso_lambda.to(acc) if isinstance(iso_lambda, torch.Tensor) else iso_lambda
        loss, parts = reference.loss_from_terms(mse_b, s_b, lam, iso_mode, w, reduction)
        d_mse, d_s, d_w = _slopes(mse_b, s_b, lam, iso_mode, w, reduction)
        # one group: the ungrouped shapes (0-dim, or (B,) for reduction "none"); else (G,) or (B,)
        shape = (-1,) if reduction == "none" else (() if groups == 1 else (groups,))
        loss, mse, iso = (x.reshape(shape).to(sse.dtype) for x in (loss, *parts[:2]))
        isotropy = parts.isotropy.reshape(() if groups == 1 else (groups,)).to(sse.dtype)
        k1, k2, d_w = ((x * f).reshape(-1).to(sse.dtype).contiguous() for x, f in ((d_mse, 2.0 / n), (d_s, 2.0 / n),
                                                                                   (d_w, 1.0)))
        ctx.save_for_backward(k1, k2, d_w)
        outputs = (loss, mse, iso, isotropy, k1, k2, d_w)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @once_differentiable  # iso_grad has no derivative of its own: no double backward through the loss
    def backward(ctx, grad_loss, *_):
        k1, k2, d_w = ctx.saved_tensors
        # Each row's upstream gradient: its own (reduction "none"), else its group's.
        g = grad_loss if grad_loss.shape == k1.shape else grad_loss.reshape(-1, 1).expand(-1, k1.numel() //
                                                                                          grad_loss.numel()).reshape(-1)
        # Halved: mse_b = sse_b / n, and k1, k2 carry the factor 2/n of d(sse)/dp and d(ssq)/dp.
        grad_sse = 0.5 * k1 * g if ctx.needs_input_grad[0] else None
        grad_ssq = 0.5 * k2 * g if ctx.needs_input_grad[1] else None
        grad_w = d_w * g if ctx.needs_input_grad[3] else None
        return grad_sse, grad_ssq, None, grad_w, None, None, None, None


@backends.register_fake("iso_sums")
def _(p, e, seed, offset, x0=None, coef=None):
    acc = reference.compute_dtype(p.dtype)
    return p.new_empty(p.shape[0], dtype=acc), p.new_empty(p.shape[0], dtype=acc)


@backends.register_fake("iso_grad")
def _(p, e, seed, offset, c1, c2, x0=None, coef=None):
    return torch.empty_like(p)


@backends.register_fake("iso_loss_tail")
def _(sse, ssq, n, weights, iso_lambda, iso_mode, reduction, lambdas=None):
    per_group = () if lambdas is None else (lambdas.shape[0],)
    per = (sse.shape[0],) if reduction == "none" else per_group
    loss, mse, iso = (sse.new_empty(per) for _ in range(3))
    return loss, mse, iso, sse.new_empty(per_group), torch.empty_like(sse), torch.empty_like(sse), torch.empty_like(sse)


def _setup_context(ctx, inputs, output):
    p, e, seed, offset, *affine = inputs
    x0, coef = (*affine, None, None)[:2]
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (x0, coef)):
        raise RuntimeError("isofast_triton::iso_sums: x0 and coef are constants (no gradient flows into them); "
                           "iso_ddpm_loss sends an x0 that requires grad to the reference")
    ctx.save_for_backward(p, e, x0, coef)
    ctx.key = (seed, offset)


def _noise_grad(p, e, x0, coef, c1, c2):
    """The gradient in an explicit noise tensor (the rule of csrc/autograd.cpp: noise_grad)."""
    pa, ea, k1 = p.to(c1.dtype), e.to(c1.dtype), c1.unsqueeze(1)
    if coef is None:
        return (-k1 * (pa - ea)).to(e.dtype)
    xa, k = x0.to(c1.dtype), coef.unsqueeze(2)  # (5, B, 1): one column per row
    r, h = pa - (k[0] * ea + k[1] * xa), k[2] * pa + k[3] * ea + k[4] * xa
    return (-k1 * k[0] * r + c2.unsqueeze(1) * k[3] * h).to(e.dtype)


def _backward(ctx, grad_sse, grad_ssq):
    """dp = iso_grad(p, e, 2 g_sse, 2 g_ssq, x0, coef); de = `_noise_grad` (the rule of csrc/autograd.cpp)."""
    if torch.is_grad_enabled():  # create_graph=True: iso_grad has no derivative (as in csrc/autograd.cpp)
        raise RuntimeError(ONCE_DIFFERENTIABLE)
    p, e, x0, coef = ctx.saved_tensors
    c1, c2 = (2 * grad_sse).contiguous(), (2 * grad_ssq).contiguous()
    grad_p = None
    if ctx.needs_input_grad[0]:
        affine = () if coef is None else (x0, coef)
        grad_p = torch.ops.isofast_triton.iso_grad(p, e, *ctx.key, c1, c2, *affine)
    grad_e = _noise_grad(p, e, x0, coef, c1, c2) if e is not None and ctx.needs_input_grad[1] else None
    return (grad_p, grad_e, None, None) + (None,) * (len(ctx.needs_input_grad) - 4)


torch.library.register_autograd("isofast_triton::iso_sums", _backward, setup_context=_setup_context)
