"""The diffusers training-loop row: one step of diffusers' unconditional loop on a tiny `UNet2DModel`, as
written there (``noise_scheduler.add_noise`` + ``F.mse_loss``, `_baselines.DiffusersLoopStep`) against the
same loop with isofast's ``q_sample`` + ``iso_ddpm_loss`` in their place (examples/diffusers_unconditional.py).

Both compute one objective, the Iso-Diffusion loss MSE + λ (mean eps_pred² − 1)² (λ = `ISO_LAMBDA`, "batch"
mode): the diffusers loop with the isotropy term written in torch ops beside its ``F.mse_loss``. Each variant
is a full step (t, noising, forward, loss, backward, AdamW) on its own copy of the same UNet, checked first by
its gradients of one step against `isofast.reference` on the same t and noise.
"""
from __future__ import annotations

import copy

import _baselines as B
import torch
from _rows import ISO_LAMBDA, Row, Settings, Variant, shape_text, skipped
from _rows_models import _compare_grads, _reference_grads

from isofast import NoiseKey, NoiseSchedule, iso_ddpm_loss, q_sample

# a small UNet2DModel of diffusers' example blocks (DownBlock2D / UpBlock2D), no attention (whose key-bias gradients
# are zero in exact arithmetic: float noise there fails any relative check)
UNET_CONFIG = {"in_channels": 3, "out_channels": 3, "layers_per_block": 1, "block_out_channels": [32, 64],
               "norm_num_groups": 8, "down_block_types": ["DownBlock2D", "DownBlock2D"],
               "up_block_types": ["UpBlock2D", "UpBlock2D"], "add_attention": False}
T = 1000
NOTE = (f"both compute MSE + {ISO_LAMBDA} (mean eps_pred^2 - 1)^2 (Iso-Diffusion, batch mode): diffusers' "
        "add_noise + F.mse_loss + the isotropy term in torch ops vs isofast's q_sample + iso_ddpm_loss; "
        "a full step each (noising, forward, loss, backward, AdamW)")


class FusedLoopStep:
    """The same step with isofast's ``q_sample`` (noise: a `NoiseKey`) and ``iso_ddpm_loss`` on ``backend``."""

    def __init__(self, unet, scheduler, iso_lambda: float, backend: str, lr: float = 1e-4):
        self.unet, self.iso_lambda, self.backend = unet, iso_lambda, backend
        self.sched = NoiseSchedule.from_diffusers(scheduler)
        self.opt = torch.optim.AdamW(unet.parameters(), lr=lr)

    def __call__(self, x0: torch.Tensor, t: torch.Tensor | None = None, noise: NoiseKey | None = None):
        if t is None:
            t = torch.randint(0, self.sched.T, (x0.shape[0],), device=x0.device)
        x_t, noise = q_sample(x0, t, self.sched, noise, backend=self.backend)
        loss = iso_ddpm_loss(self.unet(x_t, t).sample, noise, iso_lambda=self.iso_lambda, backend=self.backend)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def _gradient_check(step, x0, sched, noise_as_key: bool):
    """Gradients of one step against isofast.reference on the same t and noise (the step's draws replaced)."""
    from isofast.diffusers_bridge.models import DiffusersUNet2D

    def check():
        gen = torch.Generator().manual_seed(11)
        t = torch.randint(0, sched.T, (x0.shape[0],), generator=gen).to(x0.device)
        key = NoiseKey.draw(x0.shape, torch.float32, x0.device, gen)
        before = DiffusersUNet2D(unet=copy.deepcopy(step.unet))
        step(x0, t, key if noise_as_key else key.materialize())
        _compare_grads(step.unet, _reference_grads(before, x0, t, key.materialize(), sched), 1e-3, 1e-4)
        return "gradients of one step vs isofast.reference (same t, noise)"

    return check


def diffusers_loop_row(settings: Settings, batch: int, size: int) -> Row:
    """One diffusers-loop training step of the tiny UNet2DModel on (batch, 3, size, size) images."""
    dev = settings.device
    shape = (batch, 3, size, size)
    name = f"diffusers loop step/unet2d-tiny/{shape_text(shape)}"
    params = {"model": "diffusers UNet2DModel (tiny)", "shape": shape, "T": T, "iso_lambda": ISO_LAMBDA}
    scheduler = B.diffusers_scheduler(T, 1e-4, 0.02)
    if scheduler is None:
        reason = B.diffusers_missing("DDPMScheduler")
        variants = [skipped("diffusers add_noise + mse_loss", "eager", reason),
                    *(skipped(f"isofast[{b}]", "isofast", reason) for b in settings.fused_backends)]
        return Row(name, "train step", params, variants, 2, items=batch, item_unit="images", note=NOTE)
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    base = UNet2DModel.from_config({**UNET_CONFIG, "sample_size": size}).to(dev)
    sched = NoiseSchedule.from_diffusers(scheduler)
    g = torch.Generator().manual_seed(3)
    x0 = [torch.randn(shape, generator=g).clamp(-1, 1).to(dev) for _ in range(2)]
    eager = B.DiffusersLoopStep(copy.deepcopy(base), scheduler, ISO_LAMBDA)
    variants = [Variant("diffusers add_noise + mse_loss", "eager", lambda i: eager(x0[i]),
                        _gradient_check(eager, x0[0], sched, noise_as_key=False))]
    for backend in settings.fused_backends:
        fused = FusedLoopStep(copy.deepcopy(base), scheduler, ISO_LAMBDA, backend)
        variants.append(Variant(f"isofast[{backend}]", "isofast", lambda i, fused=fused: fused(x0[i]),
                                _gradient_check(fused, x0[0], sched, noise_as_key=True)))
    return Row(name, "train step", params, variants, len(x0), items=batch, item_unit="images", note=NOTE)
