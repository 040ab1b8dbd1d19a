"""Rows with a model in the loop: full DDPM sampling runs and one UNet training step.

Sampling: the user-written loop (model + eager step with ``torch.randn_like``), diffusers'
``DDPMScheduler`` loop, and `isofast.sampling.ddpm_sample` on each fused backend, eagerly and (on
CUDA) with the step captured as a CUDA graph. The isofast variants are checked against
``ddpm_sample(backend="reference")`` with the same generator on a short schedule (T = 10, the same
shape up to 512 samples): same keys, so the same samples. The user loop is checked exactly the
same way by feeding it the sampler's keys; the diffusers loop (its noise cannot be supplied)
only for shape and finiteness.

Training: the plain eager loop of `_baselines.PlainTrainStep` (fp32, Adam, EMA) against
`isofast.train.Trainer.train_step` with the same optimizer and EMA and no gradient clipping.
Both are checked by the gradients of one step against `isofast.reference` on the same t and
noise (the trainer's draw is replayed from its generator state).
"""
from __future__ import annotations

import copy
import tempfile

import _baselines as B
import _harness as H
import torch
from _rows import ISO_LAMBDA, Row, Settings, Target, Variant, shape_text, skipped

from isofast import NoiseKey, NoiseSchedule, reference
from isofast.sampling import ddim_sample, ddpm_sample, step_key

CHECK_T = 10
CHECK_MAX_BATCH = 512


def _graph_modes(settings: Settings) -> list[bool]:
    return [False, True] if settings.device.type == "cuda" else [False]


def sampling_row(settings: Settings, label: str, model: torch.nn.Module, shape, T: int, *,
                 target: Target | None = None) -> Row:
    """A full T-step DDPM sampling run of ``model`` at ``shape`` (B, ...)."""
    dev = settings.device
    model = model.to(dev).eval()
    sched = NoiseSchedule.linear(T)
    tables = B.step_tables(sched, dev)
    check_sched = NoiseSchedule.linear(CHECK_T)
    check_shape = (min(shape[0], CHECK_MAX_BATCH), *shape[1:])
    g = torch.Generator().manual_seed(99)
    x_T = [torch.randn(shape, generator=g).to(dev) for _ in range(2)]

    def reference_samples():
        return ddpm_sample(model, check_shape, check_sched, backend="reference", device=dev, progress=False,
                           cuda_graph=False, generator=torch.Generator().manual_seed(5))

    def eager_check():
        # Replay the sampler's key scheme (see isofast.sampling): x_T key, then the step-noise seed.
        gen = torch.Generator().manual_seed(5)
        x_key = NoiseKey.draw(check_shape, torch.float32, dev, gen)
        seed = NoiseKey.draw(check_shape, torch.float32, dev, gen).seed
        out = B.ddpm_loop(model, x_key.materialize(), B.step_tables(check_sched, dev),
                          lambda i, x: step_key(seed, i, x.shape, x.dtype, x.device).materialize())
        H.assert_close("samples", out, reference_samples(), 1e-4, 1e-4)
        return f"exact vs ddpm_sample(backend='reference') (T={CHECK_T}, sampler's keys supplied)"

    variants = [Variant("eager loop", "eager", lambda i: B.ddpm_loop(model, x_T[i], tables), eager_check)]
    scheduler = B.diffusers_scheduler(T, 1e-4, 0.02)
    if scheduler is not None:
        check_scheduler = B.diffusers_scheduler(CHECK_T, 1e-4, 0.02)

        def diffusers_check():
            out = B.diffusers_loop(model, x_T[0][: check_shape[0]], check_scheduler)
            if out.shape != check_shape or not torch.isfinite(out).all():
                raise AssertionError("diffusers loop gave a wrong shape or non-finite samples")
            return f"sanity only (T={CHECK_T}: shape, finite); its noise cannot be supplied"

        variants.append(Variant("diffusers DDPMScheduler loop", "baseline",
                                lambda i: B.diffusers_loop(model, x_T[i], scheduler), diffusers_check))
    else:
        variants.append(skipped("diffusers DDPMScheduler loop", "baseline", B.diffusers_missing("DDPMScheduler")))
    for name in [*settings.fused_backends]:
        for graph in _graph_modes(settings):
            variants.append(_isofast_sampling_variant(model, shape, check_shape, sched, check_sched, dev, name, graph,
                                                      reference_samples))
    return Row(f"ddpm sampling/{label}/{shape_text(shape)}/{T} steps", "sampling",
               {"model": label, "shape": shape, "T": T}, variants, len(x_T), items=shape[0], item_unit="samples",
               target=target, long=True)


def ddim_sampling_row(settings: Settings, label: str, model: torch.nn.Module, shape, T: int, steps: int) -> Row:
    """Deterministic DDIM sampling (eta = 0) in ``steps`` jumps of a T-step schedule.

    With eta = 0 every loop is a function of x_T alone, so all of them (the user loop and diffusers'
    DDIMScheduler included) are checked exactly against ``ddim_sample(backend="reference")`` from
    the x_T that sampler drew.
    """
    dev = settings.device
    model = model.to(dev).eval()
    sched = NoiseSchedule.linear(T)
    ab = sched.alphas_cumprod.to(dev)
    check_T, check_steps = CHECK_T, CHECK_T // 2
    check_sched = NoiseSchedule.linear(check_T)
    check_shape = (min(shape[0], CHECK_MAX_BATCH), *shape[1:])
    g = torch.Generator().manual_seed(98)
    x_T = [torch.randn(shape, generator=g).to(dev) for _ in range(2)]

    def reference_samples():
        return ddim_sample(model, check_shape, check_sched, check_steps, 0.0, backend="reference", device=dev,
                           progress=False, cuda_graph=False, generator=torch.Generator().manual_seed(5))

    def reference_x_T():  # the first draw of ddim_sample's generator is x_T's key (see isofast.sampling)
        return NoiseKey.draw(check_shape, torch.float32, dev, torch.Generator().manual_seed(5)).materialize()

    def loop_check(loop, what):
        def check():
            H.assert_close("samples", loop(reference_x_T()), reference_samples(), 1e-3, 1e-4)
            return f"exact vs ddim_sample(backend='reference') from the same x_T (T={check_T}, {check_steps} steps){what}"

        return check

    variants = [Variant("eager loop", "eager", lambda i: B.ddim_loop(model, x_T[i], ab, steps),
                        loop_check(lambda x: B.ddim_loop(model, x, check_sched.alphas_cumprod.to(dev), check_steps), ""))]
    scheduler = B.diffusers_ddim_scheduler(T, 1e-4, 0.02)
    if scheduler is not None:
        check_scheduler = B.diffusers_ddim_scheduler(check_T, 1e-4, 0.02)
        variants.append(Variant(
            "diffusers DDIMScheduler loop", "baseline", lambda i: B.diffusers_ddim_loop(model, x_T[i], scheduler, steps),
            loop_check(lambda x: B.diffusers_ddim_loop(model, x, check_scheduler, check_steps),
                       "; diffusers' float32 alphas_cumprod: rtol 1e-3")))
    else:
        variants.append(skipped("diffusers DDIMScheduler loop", "baseline", B.diffusers_missing("DDIMScheduler")))
    for name in settings.fused_backends:
        for graph in _graph_modes(settings):
            def run(i, name=name, graph=graph):
                return ddim_sample(model, shape, sched, steps, 0.0, backend=name, device=dev, cuda_graph=graph,
                                   progress=False)

            def check(name=name, graph=graph):
                out = ddim_sample(model, check_shape, check_sched, check_steps, 0.0, backend=name, device=dev,
                                  cuda_graph=graph, progress=False, generator=torch.Generator().manual_seed(5))
                H.assert_close("samples", out, reference_samples(), 1e-4, 1e-4)
                return f"exact vs ddim_sample(backend='reference') (T={check_T}, same generator)"

            variants.append(Variant(f"isofast[{name}]" + ("+graph" if graph else ""), "isofast", run, check))
    return Row(f"ddim sampling/{label}/{shape_text(shape)}/{steps} of {T} steps", "sampling",
               {"model": label, "shape": shape, "T": T, "steps": steps, "eta": 0.0}, variants, len(x_T),
               items=shape[0], item_unit="samples", long=True)


def _isofast_sampling_variant(model, shape, check_shape, sched, check_sched, dev, name, graph, reference_samples):
    def run(i):
        return ddpm_sample(model, shape, sched, backend=name, device=dev, cuda_graph=graph, progress=False)

    def check():
        out = ddpm_sample(model, check_shape, check_sched, backend=name, device=dev, cuda_graph=graph,
                          progress=False, generator=torch.Generator().manual_seed(5))
        H.assert_close("samples", out, reference_samples(), 1e-4, 1e-4)
        return f"exact vs ddpm_sample(backend='reference') (T={CHECK_T}, same generator)"

    return Variant(f"isofast[{name}]" + ("+graph" if graph else ""), "isofast", run, check)


# ----- training -----------------------------------------------------------------------------------------
def _randomize_head(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The UNet zero-initialises its output conv, which would make every other gradient zero at step 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith("conv_out"):
            with torch.no_grad():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def _reference_grads(model, x0, t, eps, sched):
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    x_t = reference.q_sample(x0, t, sched, eps)
    loss, _ = reference.iso_ddpm_loss(model(x_t, t), eps, ISO_LAMBDA, "batch")
    loss.backward()
    return [p.grad for p in model.parameters()]


def _compare_grads(model, ref_grads, rtol, atol):
    for (name, p), ref in zip(model.named_parameters(), ref_grads, strict=True):
        H.assert_close(f"grad of {name}", p.grad, ref, rtol, atol)


def train_row(settings: Settings, config_name: str, batch: int, trainer_modes: list[tuple[str, dict]]) -> Row:
    """One UNet training step (forward, backward, Adam, EMA) on batch x0; images/s from the median."""
    from isofast.models.unet import build_unet

    dev = settings.device
    torch.manual_seed(0)
    base = _randomize_head(build_unet(config_name), 1)
    size, chans = base.config.image_size, base.config.in_channels
    shape = (batch, chans, size, size)
    sched = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(3)
    x0 = [torch.randn(shape, generator=g).clamp(-1, 1).to(dev) for _ in range(2)]

    plain = B.PlainTrainStep(copy.deepcopy(base).to(dev), sched, ISO_LAMBDA, lr=2e-4, ema_decay=0.999)

    def plain_check():
        gen = torch.Generator().manual_seed(11)
        t = torch.randint(0, sched.T, (batch,), generator=gen).to(dev)
        eps = torch.randn(shape, generator=gen).to(dev)
        before = copy.deepcopy(plain.model)
        plain(x0[0], t, eps)
        _compare_grads(plain.model, _reference_grads(before, x0[0], t, eps, sched), 1e-3, 1e-4)
        return "exact: gradients of one step vs isofast.reference (same t, noise)"

    variants = [Variant("plain eager loop fp32", "eager", lambda i: plain(x0[i]), plain_check)]
    for label, overrides in trainer_modes:
        variants.append(_trainer_variant(label, overrides, base, x0, sched, dev, batch))
    target = Target(vs_eager=1.3) if dev.type == "cuda" else None
    return Row(f"train step/unet-{config_name}/{shape_text(shape)}", "train step",
               {"model": f"unet {config_name}", "shape": shape, "iso_lambda": ISO_LAMBDA}, variants, len(x0),
               items=batch, item_unit="images", target=target)


def _trainer_variant(label, overrides, base, x0, sched, dev, batch) -> Variant:
    from isofast.train import TrainConfig, Trainer

    out_dir = tempfile.mkdtemp(prefix="isofast-bench-")
    config = TrainConfig(out_dir=out_dir, steps=10**9, batch_size=batch, lr=2e-4, optimizer="adam",
                         grad_clip=None, ema_decay=0.999, iso_lambda=ISO_LAMBDA, iso_mode="batch",
                         schedule="linear", T=sched.T, device=str(dev), progress=False, tensorboard=False,
                         **overrides)
    trainer = Trainer(copy.deepcopy(base), torch.cat(x0), config)
    bf16 = overrides.get("precision") == "bf16"

    def check():
        state = trainer.noise_generator.get_state()
        t, noise = trainer._noise_for_step(tuple(x0[0].shape))
        trainer.noise_generator.set_state(state)  # train_step draws the same t and key again
        eps = noise.materialize() if isinstance(noise, NoiseKey) else noise
        before = copy.deepcopy(trainer.model).to(memory_format=torch.contiguous_format)
        trainer.train_step(x0[0])
        # bf16 autocast changes every matmul/conv: only a loose agreement is meaningful there.
        rtol, atol = (0.1, 0.05) if bf16 else (1e-3, 1e-4)
        _compare_grads(trainer.model, _reference_grads(before, x0[0], t, eps, sched), rtol, atol)
        return "gradients of one step vs isofast.reference (the trainer's own t and key)" + (
            ", loose (bf16 autocast)" if bf16 else "")

    return Variant(f"isofast Trainer {label}", "isofast", lambda i: trainer.train_step(x0[i]), check)
