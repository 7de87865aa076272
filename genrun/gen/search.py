"""The initial learning-rate search of Appendix C.4.2."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .probe import ProbeScope, probe_losses
from .snapshot import StepSnapshot


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


def search_ratio(rec: dict[str, Any], closure: Callable[[], Any], snap: StepSnapshot, scope: ProbeScope,
                 head: Tensor, device: torch.device, lr0: float,
                 reduce: Callable[[Tensor, int], list[float]]) -> tuple[float, bool]:
    """The multiplier of the grid lr with the lowest loss along this step's direction.

    Fills ``rec`` (points, losses, reason, eta_star); returns ``(r, done)``, where
    ``done`` is False when the step could not be searched (δ = 0, lr 0) and the next
    probe should try again.
    """
    grid = lr_grid()
    if not lr0 > 0.0:
        rec["reason"] = "degenerate"
        return 1.0, False
    mults = [g / lr0 for g in grid]
    vals = probe_losses(closure, snap.place, mults, scope, device)
    host = reduce(torch.stack([head[0], head[1], *[v.to(head) for v in vals]]), 2)
    dd, losses = host[0], host[2:]
    rec.update(points=mults, losses=losses, delta_norm=math.sqrt(max(dd, 0.0)))
    if dd == 0.0:
        rec["reason"] = "skipped_step"
        return 1.0, False
    best = best_on_grid(grid, losses)
    if best is None:
        rec["reason"] = "nonfinite"
        return 1.0, True
    rec.update(reason="init_search", accepted=True, eta_star=grid[best])
    return mults[best], True
