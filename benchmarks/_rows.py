"""Rows of the benchmark: what is timed, against which baselines, and how each is checked first.

A `Row` is one workload (op, dtype, shape) with its `Variant`s: the user-written eager baseline
(role "eager"), the same under ``torch.compile`` (role "compile"), other baselines (diffusers),
and isofast on each available backend (role "isofast"). Every variant has a ``check`` that runs
before it is timed and raises AssertionError when its answer is wrong: isofast variants are
compared element by element with `isofast.reference` fed the very noise the fused path used
(regenerated from the returned `NoiseKey`); baselines are compared exactly where their noise
can be supplied, and otherwise given a statistical sanity check (the check says which).

This module holds the data types and the op rows (q_sample, loss, noising + loss, one sampler
step); `_rows_models` holds the sampling and training rows.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import _baselines as B
import _harness as H
import torch

import isofast
from isofast import NoiseKey, NoiseSchedule, reference
from isofast.ops import backends

ISO_LAMBDA = 0.3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# rtol, atol relative to max|reference|: fp32 differs only by the noise contract's few ulp of
# log/sin/cos (< 4e-6 absolute); bf16 outputs can land one bf16 ulp (2^-8 relative) apart.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}


@dataclass
class Target:
    """Required speed-ups of the isofast variants this target applies to (None: not required)."""

    vs_eager: float | None = None
    vs_compile: float | None = None
    bandwidth_fraction: float | None = None
    variant_suffix: str = ""  # applies to isofast variants whose name ends so ("" = every fused one)

    def applies(self, variant: Variant) -> bool:
        return variant.role == "isofast" and "[reference]" not in variant.name and variant.name.endswith(
            self.variant_suffix
        )

    def text(self) -> str:
        parts = []
        if self.vs_eager:
            parts.append(f">={self.vs_eager:g}x eager")
        if self.vs_compile:
            parts.append(f">={self.vs_compile:g}x compile")
        if self.bandwidth_fraction:
            parts.append(f">={self.bandwidth_fraction:.0%} copy BW")
        return ", ".join(parts)


@dataclass
class Variant:
    name: str
    role: str  # "eager" | "compile" | "baseline" | "isofast"
    fn: Callable[[int], object]
    check: Callable[[], str]  # returns what it checked; raises AssertionError when wrong
    status: str = "pending"  # "ok" | "failed" | "skipped" (a baseline that cannot run here: message says why)
    message: str = ""
    check_note: str = ""
    timing: H.Timing | None = None
    peak_bytes: int | None = None
    derived: dict = field(default_factory=dict)


def skipped(name: str, role: str, reason: str) -> Variant:
    """A variant that cannot run here, listed with ``reason`` (why, and how to get it) instead of vanishing."""
    return Variant(name, role, None, None, status="skipped", message=reason)


@dataclass
class Row:
    name: str
    group: str
    params: dict
    variants: list[Variant]
    n_inputs: int
    bytes_floor: int | None = None  # minimum bytes the fused op must move (see `floor_note`)
    floor_note: str = ""
    items: int | None = None  # e.g. images per call, for a throughput figure
    item_unit: str = ""
    target: Target | None = None
    long: bool = False  # whole sampling runs: no warm-up calls, one call per sample
    duration_s: float | None = None  # wall time of the whole row (build, checks, timings): the next run's estimate
    flops: int | None = None  # arithmetic floor: FLOPs one call must do (the ensemble rows)
    flop_rate: float | None = None  # this machine's fp32 matmul FLOP/s, measured in the same run
    note: str = ""  # what the reader must know to compare the variants (e.g. that they compute the same objective)


@dataclass
class Settings:
    device: torch.device
    quick: bool
    compile: bool
    fused_backends: list[str]  # available fused isofast backends for this device
    repeat: int


def shape_text(shape) -> str:
    return "x".join(str(s) for s in shape)


def fused_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(fused backends that can run on ``device``, {backend: availability text} for every backend).

    Triton on CPU tensors runs only under its interpreter, which is a correctness tool, not a
    speed: it is reported and not timed.
    """
    names, report = [], {}
    for name in backends.BACKENDS:
        ok, reason = backends.status(name)
        if name == "reference":
            report[name] = f"available: {reason}"
            continue
        runs_here = {"cpu": device.type == "cpu", "cuda": device.type == "cuda", "triton": device.type == "cuda"}[name]
        if ok and runs_here:
            names.append(name)
            report[name] = f"available: {reason}"
        elif ok:
            report[name] = f"not for {device.type} tensors here ({reason})"
        else:
            report[name] = f"unavailable: {reason}"
    return names, report


# A second compiled baseline on CPU: the noise drawn by eager torch.randn_like and passed in.
# Inductor's own CPU random numbers are several times slower than eager's, so there this is the
# stronger baseline; the "vs compile" figure is taken against the faster of the two. On CUDA,
# Inductor generates the noise in-kernel (Philox) and the plain compiled function is the strong one.
EAGER_RANDN = "torch.compile, eager randn"


def _cpu(settings: Settings) -> bool:
    return settings.device.type == "cpu"


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _with_eager_randn(q_sample_fn):
    def run(x0, t, sqrt_ab, sqrt_1mab, noise=None):
        return q_sample_fn(x0, t, sqrt_ab, sqrt_1mab, torch.randn_like(x0) if noise is None else noise)

    return run


def _isofast_variants(settings: Settings, make: Callable[[str], tuple[Callable, Callable]]) -> list[Variant]:
    """One variant per fused backend plus the isofast reference path; ``make(backend) -> (fn, check)``."""
    out = []
    for name in [*settings.fused_backends, "reference"]:
        fn, check = make(name)
        out.append(Variant(f"isofast[{name}]", "isofast", fn, check))
    return out


# ----- inputs -------------------------------------------------------------------------------------------
def _inputs(shape, dtype, device, sched, n_sets: int | None = None, *, grad: bool) -> dict[str, list]:
    """n input sets (rotated): x0, t, eps_pred (leaf, requires grad if ``grad``), a key and its noise."""
    elem = torch.tensor([], dtype=dtype).element_size()
    numel = math.prod(shape)
    n = n_sets or H.rotation_count(3 * numel * elem, device)
    g = torch.Generator().manual_seed(1234)
    sets: dict[str, list] = {"x0": [], "t": [], "eps_pred": [], "key": [], "noise": []}
    for i in range(n):
        sets["x0"].append(torch.randn(shape, generator=g).to(device=device, dtype=dtype))
        sets["t"].append(torch.randint(0, sched.T, (shape[0],), generator=g).to(device))
        p = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        sets["eps_pred"].append(p.requires_grad_(grad))
        key = NoiseKey(seed=1000 + i, offset=0, shape=tuple(shape), dtype=dtype, device=device)
        sets["key"].append(key)
        sets["noise"].append(key.materialize())
    return sets


class _OpSetup(NamedTuple):
    """What an op row starts from: its dtype, the linear schedule (T = 1000) and its sqrt(ab),
    sqrt(1 - ab) tables on the device, the rotated input sets and the output tolerances."""

    dtype: torch.dtype
    sched: NoiseSchedule
    sched_dev: NoiseSchedule
    sqrt_ab: torch.Tensor
    sqrt_1mab: torch.Tensor
    ins: dict[str, list]
    rtol: float
    atol: float


def _op_setup(settings: Settings, dtype_name: str, shape, *, grad: bool) -> _OpSetup:
    dev, dtype = settings.device, DTYPES[dtype_name]
    sched = NoiseSchedule.linear(1000)
    sd = sched.to(device=dev)
    return _OpSetup(dtype, sched, sd, sd.sqrt_alphas_cumprod, sd.sqrt_one_minus_alphas_cumprod,
                    _inputs(shape, dtype, dev, sched, grad=grad), *TOLERANCES[dtype])


def _grad_of(loss, p):
    (g,) = torch.autograd.grad(loss, p)
    return g


def _ref_loss_grad(p, eps, mode):
    q = p.detach().clone().requires_grad_(True)
    loss, _ = reference.iso_ddpm_loss(q, eps, ISO_LAMBDA, mode)
    return loss, _grad_of(loss, q)


# ----- op rows ------------------------------------------------------------------------------------------
def q_sample_row(settings: Settings, dtype_name: str, shape, use_compile: bool) -> Row:
    setup = _op_setup(settings, dtype_name, shape, grad=False)
    dtype, sched, ins, rtol, atol = setup.dtype, setup.sched, setup.ins, setup.rtol, setup.atol
    sqrt_ab, sqrt_1mab = setup.sqrt_ab, setup.sqrt_1mab

    def baseline(fn):
        def run(i):
            return fn(ins["x0"][i], ins["t"][i], sqrt_ab, sqrt_1mab)

        def check():
            x_t, noise = run(0)  # its own randn noise is returned: the check is exact
            H.assert_close("x_t", x_t, reference.q_sample(ins["x0"][0], ins["t"][0], sched, noise), rtol, atol)
            return "exact vs reference (given the noise it drew)"

        return run, check

    def fused(name):
        def run(i):
            return isofast.q_sample(ins["x0"][i], ins["t"][i], sched, backend=name)

        def check():
            x_t, key = run(0)
            eps = key.materialize()
            H.assert_close("x_t", x_t, reference.q_sample(ins["x0"][0], ins["t"][0], sched, eps), rtol, atol)
            return "exact vs reference (noise regenerated from the returned key)"

        return run, check

    variants = [Variant("eager", "eager", *baseline(B.q_sample))]
    if use_compile:
        variants.append(Variant("torch.compile", "compile", *baseline(_compiled(B.q_sample))))
    if use_compile and _cpu(settings):
        variants.append(Variant(EAGER_RANDN, "compile", *baseline(_with_eager_randn(_compiled(B.q_sample)))))
    variants += _isofast_variants(settings, fused)
    elem = torch.tensor([], dtype=dtype).element_size()
    return Row(f"q_sample/{dtype_name}/{shape_text(shape)}", "q_sample", {"dtype": dtype_name, "shape": shape},
               variants, len(ins["x0"]), bytes_floor=2 * math.prod(shape) * elem,
               floor_note="read x0 + write x_t (noise generated in-kernel)")


def loss_row(settings: Settings, mode: str, dtype_name: str, shape, use_compile: bool, tensor_noise: bool) -> Row:
    setup = _op_setup(settings, dtype_name, shape, grad=True)
    dtype, ins, rtol, atol = setup.dtype, setup.ins, setup.rtol, setup.atol

    def check_against_reference(run):
        loss, grad = run(0)
        ref_loss, ref_grad = _ref_loss_grad(ins["eps_pred"][0], ins["noise"][0], mode)
        H.assert_close("loss", loss, ref_loss, 1e-4, 1e-5)
        H.assert_close("grad", grad, ref_grad, rtol, atol)
        return "exact vs reference (same noise)"

    def baseline(loss_fn):
        def run(i):
            loss = loss_fn(ins["eps_pred"][i], ins["noise"][i], ISO_LAMBDA, mode)
            return loss, _grad_of(loss, ins["eps_pred"][i])

        return run, lambda: check_against_reference(run)

    def fused(name, noise_kind="key"):
        def run(i):
            noise = ins["key"][i] if noise_kind == "key" else ins["noise"][i]
            loss = isofast.iso_ddpm_loss(ins["eps_pred"][i], noise, ISO_LAMBDA, mode, backend=name)
            return loss, _grad_of(loss, ins["eps_pred"][i])

        return run, lambda: check_against_reference(run)

    variants = [Variant("eager", "eager", *baseline(B.iso_loss))]
    if use_compile:
        variants.append(Variant("torch.compile", "compile", *baseline(_compiled(B.iso_loss))))
    variants += _isofast_variants(settings, fused)
    if tensor_noise:
        for name in settings.fused_backends:
            variants.append(Variant(f"isofast[{name}] eps tensor", "isofast", *fused(name, "tensor")))
    elem = torch.tensor([], dtype=dtype).element_size()
    return Row(f"loss fwd+bwd/{mode}/{dtype_name}/{shape_text(shape)}", "loss", {"mode": mode, "dtype": dtype_name,
               "shape": shape}, variants, len(ins["x0"]), bytes_floor=3 * math.prod(shape) * elem,
               floor_note="read eps_pred (fwd) + read eps_pred + write grad (bwd); eps from the key")


def noise_loss_row(settings: Settings, dtype_name: str, shape, use_compile: bool) -> Row:
    """Noising + loss fwd + bwd: the per-step work of training outside the model (eps_pred stands in for it)."""
    setup = _op_setup(settings, dtype_name, shape, grad=True)
    dtype, sched, sd, ins, rtol, atol = setup.dtype, setup.sched, setup.sched_dev, setup.ins, setup.rtol, setup.atol
    sqrt_ab, sqrt_1mab = setup.sqrt_ab, setup.sqrt_1mab

    def forward(x0, t, p, noise=None):
        x_t, noise = B.q_sample(x0, t, sqrt_ab, sqrt_1mab, noise)
        return x_t, B.iso_loss(p, noise, ISO_LAMBDA, "batch")

    def baseline(fwd, exact: bool, eager_randn: bool = False):
        def run(i, noise=None):
            p = ins["eps_pred"][i]
            if eager_randn and noise is None:
                noise = torch.randn_like(ins["x0"][i])
            x_t, loss = fwd(ins["x0"][i], ins["t"][i], p, noise)
            return x_t, loss, _grad_of(loss, p)

        def check():
            if exact:
                x_t, loss, grad = run(0, ins["noise"][0])
                _compare(x_t, loss, grad, ins["noise"][0])
                return "exact vs reference (noise supplied)"
            # The compiled graph draws its own noise in-kernel and does not return it: check the
            # statistics it must have. Against the reference with an independent draw, the loss
            # (about 2 + lambda * iso for unit-variance eps_pred) agrees to well under 2% at these
            # sizes, and x_t's noise part has unit variance.
            x_t, loss, grad = run(0)
            ref_loss, ref_grad = _ref_loss_grad(ins["eps_pred"][0], ins["noise"][0], "batch")
            if not abs(float(loss.detach()) / float(ref_loss.detach()) - 1) < 0.02:
                raise AssertionError(f"loss {float(loss.detach()):.5g} vs reference {float(ref_loss.detach()):.5g} (independent noise)")
            _check_noise_variance(x_t, ins["x0"][0], ins["t"][0], sd)
            if grad.shape != ref_grad.shape or not torch.isfinite(grad.float()).all():
                raise AssertionError("grad has the wrong shape or non-finite values")
            return "statistical (own noise not observable): loss within 2%, unit noise variance"

        return (lambda i: run(i)), check

    def _compare(x_t, loss, grad, eps):
        H.assert_close("x_t", x_t, reference.q_sample(ins["x0"][0], ins["t"][0], sched, eps), rtol, atol)
        ref_loss, ref_grad = _ref_loss_grad(ins["eps_pred"][0], eps, "batch")
        H.assert_close("loss", loss, ref_loss, 1e-4, 1e-5)
        H.assert_close("grad", grad, ref_grad, rtol, atol)

    def fused(name):
        def run(i):
            p = ins["eps_pred"][i]
            x_t, key = isofast.q_sample(ins["x0"][i], ins["t"][i], sched, backend=name)
            loss = isofast.iso_ddpm_loss(p, key, ISO_LAMBDA, "batch", backend=name)
            return x_t, key, loss, _grad_of(loss, p)

        def check():
            x_t, key, loss, grad = run(0)
            _compare(x_t, loss, grad, key.materialize())
            return "exact vs reference (noise regenerated from the key)"

        return run, check

    variants = [Variant("eager", "eager", *baseline(forward, exact=True))]
    if use_compile:
        variants.append(Variant("torch.compile", "compile", *baseline(_compiled(forward), exact=False)))
    if use_compile and _cpu(settings):
        variants.append(Variant(EAGER_RANDN, "compile", *baseline(_compiled(forward), exact=True, eager_randn=True)))
    variants += _isofast_variants(settings, fused)
    elem = torch.tensor([], dtype=dtype).element_size()
    if settings.device.type == "cuda":
        target = Target(vs_eager=5.0, vs_compile=1.5, bandwidth_fraction=0.85)
    else:
        target = Target(vs_eager=2.0, vs_compile=1.2)
    return Row(f"noise+loss fwd+bwd/batch/{dtype_name}/{shape_text(shape)}", "noise+loss",
               {"dtype": dtype_name, "shape": shape, "iso_lambda": ISO_LAMBDA}, variants, len(ins["x0"]),
               bytes_floor=5 * math.prod(shape) * elem,
               floor_note="read x0 + write x_t + read eps_pred (fwd) + read eps_pred + write grad (bwd)",
               target=target)


def _check_noise_variance(x_t, x0, t, sd) -> None:
    resid = x_t.double() - sd.sqrt_alphas_cumprod.double()[t].reshape(-1, *[1] * (x0.ndim - 1)) * x0.double()
    expected = (1 - sd.alphas_cumprod.double()[t]).mean() * (resid[0].numel())
    ratio = float(resid.pow(2).flatten(1).sum(1).mean() / expected)
    if not abs(ratio - 1) < 0.05:
        raise AssertionError(f"noise in x_t has variance ratio {ratio:.4f} to the schedule's, expected 1")


def ddpm_step_row(settings: Settings, dtype_name: str, shape, use_compile: bool) -> Row:
    """One ancestral sampler step x_t -> x_{t-1} with fresh noise (eps_pred given: no model)."""
    setup = _op_setup(settings, dtype_name, shape, grad=False)
    dev, dtype, sched, ins, rtol, atol = settings.device, setup.dtype, setup.sched, setup.ins, setup.rtol, setup.atol
    tables = B.step_tables(sched, dev)
    n = len(ins["x0"])
    steps = [int(s) for s in torch.randint(1, sched.T, (n,), generator=torch.Generator().manual_seed(7))]
    t_vec = [torch.full((shape[0],), s, dtype=torch.int64, device=dev) for s in steps]

    def ref_step(i, noise):
        return reference.ddpm_step(ins["x0"][i], ins["eps_pred"][i], t_vec[i], sched, noise)

    def baseline(step_fn, exact: bool, eager_randn: bool = False):
        def run(i, noise=None):
            if eager_randn and noise is None:
                noise = torch.randn_like(ins["x0"][i])
            return step_fn(ins["x0"][i], ins["eps_pred"][i], t_vec[i], **tables, noise=noise)

        def check():
            if exact:
                H.assert_close("x_prev", run(0, ins["noise"][0]), ref_step(0, ins["noise"][0]), rtol, atol)
                return "exact vs reference (noise supplied)"
            _check_step_noise(run(0), ref_step(0, torch.zeros_like(ins["x0"][0])), float(tables["sigma"][steps[0]]))
            return "statistical: x_prev - reference mean has the posterior variance (within 5%)"

        return (lambda i: run(i)), check

    def fused(name):
        def run(i):
            return isofast.ddpm_step(ins["x0"][i], ins["eps_pred"][i], t_vec[i], sched, backend=name)

        def check():
            key = ins["key"][0]
            out = isofast.ddpm_step(ins["x0"][0], ins["eps_pred"][0], t_vec[0], sched, key, backend=name)
            H.assert_close("x_prev", out, ref_step(0, key.materialize()), rtol, atol)
            return "exact vs reference (noise regenerated from the key)"

        return run, check

    variants = [Variant("eager", "eager", *baseline(B.ddpm_step, exact=True))]
    if use_compile:
        variants.append(Variant("torch.compile", "compile", *baseline(_compiled(B.ddpm_step), exact=False)))
    if use_compile and _cpu(settings):
        variants.append(Variant(EAGER_RANDN, "compile", *baseline(_compiled(B.ddpm_step), exact=True,
                                                                   eager_randn=True)))
    scheduler = B.diffusers_scheduler(sched.T, 1e-4, 0.02)
    if scheduler is not None:
        scheduler.set_timesteps(sched.T)

        def diffusers_run(i):
            return scheduler.step(ins["eps_pred"][i], steps[i], ins["x0"][i]).prev_sample

        def diffusers_check():
            _check_step_noise(diffusers_run(0).to(dtype), ref_step(0, torch.zeros_like(ins["x0"][0])),
                              float(tables["sigma"][steps[0]]))
            return "statistical: x_prev - reference mean has the posterior variance (within 5%)"

        variants.append(Variant("diffusers DDPMScheduler.step", "baseline", diffusers_run, diffusers_check))
    else:
        variants.append(skipped("diffusers DDPMScheduler.step", "baseline", B.diffusers_missing("DDPMScheduler")))
    variants += _isofast_variants(settings, fused)
    elem = torch.tensor([], dtype=dtype).element_size()
    return Row(f"ddpm step/{dtype_name}/{shape_text(shape)}", "sampler step", {"dtype": dtype_name, "shape": shape},
               variants, n, bytes_floor=3 * math.prod(shape) * elem,
               floor_note="read x_t + read eps_pred + write x_{t-1} (noise generated in-kernel)")


def _check_step_noise(out, mean, sigma) -> None:
    ratio = float((out.double() - mean.double()).pow(2).mean()) / sigma**2
    if not abs(ratio - 1) < 0.05:
        raise AssertionError(f"step noise variance ratio {ratio:.4f} to sigma_t^2, expected 1")
