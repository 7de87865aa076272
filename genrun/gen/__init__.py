"""GeN: the Generalized Newton's method step size (Bu & Xu, ICLR 2025), pure torch.

``GeN(optimizer)`` wraps any ``torch.optim`` optimizer and keeps setting its learning
rate to the minimiser of a parabola fitted to the loss along the optimizer's own
update direction.  Nothing here imports the rest of ``genrun``.
"""

from .fit import ParabolaFit, fit_parabola, horizon_factor
from .gen import GeN
from .guard import GUARD_RULES

__all__ = ["GUARD_RULES", "GeN", "ParabolaFit", "fit_parabola", "horizon_factor"]
