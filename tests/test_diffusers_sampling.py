"""isofast's samplers on a diffusers UNet2DModel: the same samples as diffusers' DDIMPipeline."""
import pytest
import torch

from isofast import NoiseSchedule
from isofast.noise import NoiseKey
from isofast.sampling import ddim_sample

diffusers = pytest.importorskip("diffusers")
from diffusers_helpers import tiny_unet2d  # noqa: E402

from isofast.diffusers_bridge.models import DiffusersUNet2D  # noqa: E402

SHAPE, STEPS, SEED = (3, 1, 8, 8), 10, 7


def isofast_x_T(seed: int) -> torch.Tensor:
    """The x_T isofast's sampler starts from with a generator seeded ``seed`` (its first draw)."""
    return NoiseKey.draw(SHAPE, torch.float32, "cpu", torch.Generator().manual_seed(seed)).materialize()


def diffusers_ddim_loop(unet, scheduler, x):
    """DDIMPipeline's loop (diffusers/pipelines/ddim/pipeline_ddim.py) before its output clamp."""
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x


SCALED_LINEAR = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


# Unclipped, the untrained model's samples grow like 1/sqrt(ab_T): to |x| ~ 180 with the default linear
# schedule (ab_T ~ 4e-5), where 1e-4 is a few float32 ulps; with scaled_linear |x| stays ~ 25.
@pytest.mark.parametrize("clip,schedule", [(False, SCALED_LINEAR), (True, {}), (True, SCALED_LINEAR)],
                         ids=["scaled_linear", "linear-clip", "scaled_linear-clip"])
def test_ddim_sample_on_unet2d_equals_diffusers_ddim(clip, schedule):
    unet = tiny_unet2d()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=clip, **schedule))
    sched = NoiseSchedule.from_diffusers(pipe.scheduler)
    with torch.no_grad():
        ours = ddim_sample(lambda x, t: unet(x, t).sample, SHAPE, sched, steps=STEPS, eta=0.0, clip_x0=clip,
                           generator=torch.Generator().manual_seed(SEED), progress=False)
        wrapped = ddim_sample(DiffusersUNet2D(unet=unet), SHAPE, sched, steps=STEPS, eta=0.0, clip_x0=clip,
                              generator=torch.Generator().manual_seed(SEED), progress=False)
        theirs = diffusers_ddim_loop(unet, pipe.scheduler, isofast_x_T(SEED))
    assert torch.equal(ours, wrapped)
    assert (ours - isofast_x_T(SEED)).abs().max() > 0.1  # the model moved the samples: the test can tell
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_ddim_sample_equals_ddim_pipeline_output(monkeypatch):
    """The pipeline itself, its initial noise replaced by isofast's x_T: its images are isofast's samples
    mapped to [0, 1] as the pipeline maps them. x0 is clipped to [-1, 1] (clip_sample / clip_x0), so the
    last step lands in [-1, 1] and the pipeline's clamp to [0, 1] hides nothing of the untrained model."""
    unet = tiny_unet2d()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    x_T = isofast_x_T(SEED)
    monkeypatch.setattr("diffusers.pipelines.ddim.pipeline_ddim.randn_tensor", lambda *a, **k: x_T.clone())
    images = pipe(batch_size=SHAPE[0], num_inference_steps=STEPS, eta=0.0, output_type="pt").images
    with torch.no_grad():
        ours = ddim_sample(DiffusersUNet2D(unet=unet), SHAPE, NoiseSchedule.from_diffusers(pipe.scheduler),
                           steps=STEPS, clip_x0=True, generator=torch.Generator().manual_seed(SEED), progress=False)
    expected = (ours / 2 + 0.5).clamp(0, 1)
    assert ((expected > 0) & (expected < 1)).float().mean() > 0.5  # most values are inside: the clamp hides none
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-4)
