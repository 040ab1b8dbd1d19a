"""Sample-quality and process metrics: PRDC (:mod:`.prdc`), forward-process isotropy (:mod:`.isotropy`)."""

from isofast.metrics.isotropy import forward_isotropy_curve, plot_isotropy_curve
from isofast.metrics.prdc import prdc

__all__ = ["prdc", "forward_isotropy_curve", "plot_isotropy_curve"]
