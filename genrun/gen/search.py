"""The initial learning-rate search of Appendix C.4.2, and how heavy-ball momentum stretches a step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

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


def momentum_echo(param_groups: Sequence[dict[str, Any]]) -> float:
    """How much farther heavy-ball momentum carries a step: ``(1 - dampening)/(1 - μ)``.

    With ``buf ← μ·buf + (1 - dampening)·u`` (SGD, also Nesterov; RMSprop without
    dampening), a direction that persists moves the weights by the geometric sum
    ``(1 - dampening)·(1 + μ + μ² + ...)`` per unit of lr, not by 1.  The largest
    over the param groups; 1 without a ``momentum`` key (Adam's β1 averages, it
    does not accumulate).
    """
    echo = 1.0
    for group in param_groups:
        mu = float(group.get("momentum", 0.0) or 0.0)
        if 0.0 < mu < 1.0:
            echo = max(echo, (1.0 - float(group.get("dampening", 0.0) or 0.0)) / (1.0 - mu))
    return echo


#: What is left to fill of a momentum buffer that :func:`momentum_fill` counts as full.
FULL_BUFFER = 1e-3


def momentum_fill(param_groups: Sequence[dict[str, Any]], n: int) -> float:
    """How full heavy-ball momentum's buffer is after ``n`` updates: ``φ_n = buf_n/buf_∞`` along a persistent u.

    torch's SGD starts the buffer at the first update undamped, then ``buf ← μ·buf +
    (1 - dampening)·u`` (RMSprop's starts at 0, the same thing without dampening), so a
    persistent u gives ``buf_n = μ^(n-1) + (1 - dampening)·(1 - μ^(n-1))/(1 - μ)`` against
    ``(1 - dampening)/(1 - μ)`` once full: ``φ_n = 1 - μ^(n-1)·(1 - (1 - μ)/(1 - dampening))``,
    ``1 - μ^n`` undamped.  A step taken at ``n`` is ``φ_n`` of the step the same lr takes once the
    buffer is full.  The smallest over the param groups; 1 without a ``momentum`` key, and 1 once
    the buffer is within ``FULL_BUFFER`` of full (a rise it would change by 0.1 % is left alone).
    """
    fill = 1.0
    for group in param_groups:
        mu = float(group.get("momentum", 0.0) or 0.0)
        damp = float(group.get("dampening", 0.0) or 0.0)
        if 0.0 < mu < 1.0 and damp < 1.0 and n >= 1:
            rest = mu ** (n - 1) * (1.0 - (1.0 - mu) / (1.0 - damp))
            if rest > FULL_BUFFER:
                fill = min(fill, 1.0 - rest)
    return fill


def search_ratio(rec: dict[str, Any], closure: Callable[[], Any], snap: StepSnapshot, scope: ProbeScope,
                 head: Tensor, device: torch.device, lr0: float,
                 reduce: Callable[[Tensor, int], list[float]], echo: float = 1.0) -> tuple[float, bool]:
    """The multiplier of the grid lr ``η̂`` with the lowest loss along this step's direction, over ``echo``.

    The grid scores one isolated step; with heavy-ball momentum every later step
    carries ``echo`` times its rate (:func:`momentum_echo`), so the rate kept is
    ``η̂/echo``.  Measured on digits and mnist5k (README): without this, heavy-ball
    GeN-SGD took 5-60x the tuned lr, and on mnist5k half its runs diverged or died.

    Fills ``rec`` (points, losses, reason, eta_star = η̂); returns ``(r, done)``, where
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
    return mults[best] / echo, True
