"""Sample-quality and process metrics: PRDC (:mod:`.prdc`), forward-process isotropy (:mod:`.isotropy`).

Note: the function ``prdc`` re-exported here shadows the submodule as the attribute
``isofast.metrics.prdc``; reach the module with ``importlib.import_module("isofast.metrics.prdc")``.
"""

from isofast.metrics.isotropy import forward_isotropy_curve, plot_isotropy_curve
from isofast.metrics.prdc import PRDCReference, prdc

__all__ = ["PRDCReference", "prdc", "forward_isotropy_curve", "plot_isotropy_curve"]
