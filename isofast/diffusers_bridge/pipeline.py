"""A trained run -> a diffusers `DDPMPipeline` folder (`save_pretrained`), loadable with
``DDPMPipeline.from_pretrained(folder)``.

Only runs of a diffusers UNet2DModel (``isofast train --model diffusers-unet2d``) are exported: their
weights are the UNet2DModel's own. isofast's UNet and the 2-D MLPs have no diffusers counterpart
(mapping isofast's UNet onto a UNet2DModel is not implemented), so they are refused.
The scheduler is a DDPMScheduler with the run's schedule (`NoiseSchedule.to_diffusers`: clip_sample
False, "fixed_small" variance, epsilon prediction: what ``isofast sample`` does by default). A UNet2DModel
config that declares another ``num_train_timesteps`` than the run's T is refused (ValueError).
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import CheckpointError, checkpoint_meta, load_trained_model
from . import require_diffusers
from .models import check_timesteps

__all__ = ["EXPORTABLE_KINDS", "export_ddpm_pipeline"]

EXPORTABLE_KINDS = ("diffusers_unet2d",)


def export_ddpm_pipeline(checkpoint: str | Path, out: str | Path, which: str = "ema") -> Path:
    """Write the run (or checkpoint) ``checkpoint`` as a DDPMPipeline in the new or empty folder ``out``.

    ``which``: "ema" (the EMA weights; the raw ones when the run had none) or "model".
    Raises CheckpointError for a run whose model is not exportable (naming what is), FileExistsError when
    ``out`` holds files, DiffusersMissingError without diffusers. Returns ``out``.
    """
    out = Path(out)
    kind = (checkpoint_meta(checkpoint).get("model_spec") or {}).get("kind")
    if kind not in EXPORTABLE_KINDS:
        raise CheckpointError(f"cannot export a {kind or 'unrecorded'} model as a diffusers pipeline: only runs of a "
                              "diffusers UNet2DModel (isofast train --model diffusers-unet2d --model-config CFG.json) "
                              "can be exported; isofast's own UNet and MLPs have no diffusers equivalent")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: choose a new output folder")
    diffusers = require_diffusers("isofast export --diffusers")
    model, sched, _ = load_trained_model(checkpoint, which=which, device="cpu")
    # runs written before isofast checked this can hold a config of another T than their schedule's
    check_timesteps(model, sched.T, "the run's T", "its UNet2DModel config")
    # model is a DiffusersUNet2D (the recorded kind): its .unet is the UNet2DModel itself
    pipeline = diffusers.DDPMPipeline(unet=model.unet, scheduler=sched.to_diffusers("ddpm"))
    pipeline.save_pretrained(str(out))
    return out
