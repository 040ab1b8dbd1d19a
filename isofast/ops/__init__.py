"""The fused ops: argument checks, backend dispatch, autograd and torch.library registration."""
from .loss import iso_ddpm_loss
from .q_sample import q_sample
from .steps import ddim_step, ddpm_step

__all__ = ["iso_ddpm_loss", "q_sample", "ddpm_step", "ddim_step"]
