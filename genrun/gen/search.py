"""The initial learning-rate search of Appendix C.4.2."""

from __future__ import annotations

import math
from typing import Sequence


def lr_grid(low: float = 1e-6, high: float = 1e2, per_decade: int = 2) -> list[float]:
    """Exponential grid ``low .. high`` with ``per_decade`` points per decade.

    Two per decade (1, 3.16, 10, ...) doubles the paper's resolution for 17 extra
    forwards, once per run; the decade points are exact powers of ten.
    """
    lo, hi = round(math.log10(low) * per_decade), round(math.log10(high) * per_decade)
    return [10.0 ** (k / per_decade) for k in range(lo, hi + 1)]


def best_on_grid(grid: Sequence[float], losses: Sequence[float]) -> int | None:
    """Index of the lowest finite loss (ties: the smaller lr), or None if none is finite."""
    best = None
    for i, loss in enumerate(losses):
        if math.isfinite(loss) and (best is None or loss < losses[best]):
            best = i
    return best
