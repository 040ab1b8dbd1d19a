"""The fused ops: one module per op (argument checks, backend choice, fake and autograd registration).

The op libraries load first: ``torch.ops.isofast_C`` (the compiled extension, when built) and
``torch.ops.isofast_triton`` (the Triton kernels), so the op modules can register on them.
"""
from .. import kernels  # noqa: F401  (defines torch.ops.isofast_triton)
from . import extension  # noqa: F401  (loads torch.ops.isofast_C)
from .iso_loss import iso_ddpm_loss
from .q_sample import q_sample
from .steps import ddim_step, ddpm_step

__all__ = ["iso_ddpm_loss", "q_sample", "ddpm_step", "ddim_step"]
