"""The arithmetic of one GeN probe: fit, gate, smoothing, horizon, guard.

Everything here is host-side float64 math on a handful of numbers (the probe
losses after their single ``.tolist()``), so it is pure Python: no tensors, no
scipy, no syncs.  Notation, in units of the multiplier ``s`` of the step just
taken (``δ = w_t - w_{t+1} = η·d``):

    ΔL(s) = L(w_t - s·δ) - L0 ≈ (a/2)·s² - β·s,    a = η²·dᵀHd,  β = η·Gᵀd

so the paper's coefficients of (3.4) are ``A = a/η²`` and ``b = β/η`` and
``η* = b/A = η·β/a``.  ``s* = β/a`` is the minimiser of the fitted parabola,
i.e. the ratio ``η*/η``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

REASONS = ("nonfinite", "degenerate", "curvature<=0", "slope<=0", "r2", "skipped_step")


@dataclass(frozen=True)
class ParabolaFit:
    """Result of :func:`fit_parabola`: ``ΔL(s) ≈ (a/2)·s² - β·s``."""

    a: float
    beta: float
    r2: float | None
    degenerate: bool

    @property
    def s_star(self) -> float:
        """Minimiser ``s* = β/a`` of the fitted parabola (η*/η); nan if a == 0."""
        return self.beta / self.a if self.a != 0 else math.nan


def fit_parabola(
    points: Sequence[float], losses: Sequence[float], l0: float, beta: float | None = None
) -> ParabolaFit:
    """Least-squares fit of ``ΔL(s) = L(s) - L0 ≈ (a/2)·s² - β·s`` (the paper's (3.4)).

    The model is anchored at ``(0, L0)`` (no intercept), as in (3.4) and Appendix A.5,
    so a point with ``s = 0`` adds no equation.

    * ``beta`` given (GeN's default ``slope=True``): β is known exactly from the
      gradient (``β = Σ grad·δ``) and only ``a`` is fitted:
      ``a/2 = Σ s²·(ΔL + β·s) / Σ s⁴``.  With the paper's points {-1, 0, 1} that is
      two equations for one unknown, so R² measures something: the residual is the
      gap between the central finite-difference slope ``(L(-1) - L(1))/2`` and the
      exact slope β (odd, cubic terms of the loss along d).
    * ``beta=None``: (a, β) solve the 2x2 normal equations.  For {-1, 0, 1} this is
      an exact interpolation, equal to LQA's (3.5)
      ``η* = η/2 · (L(-1) - L(1)) / (L(1) - 2·L0 + L(-1))``
      (the paper writes it with ``L± := L(w ± η·d)``; our ``L(s) = L(w - s·δ)``),
      and for (0, 1, 2) it equals Appendix A.3's forward-difference form
      ``η* = η/2 · (3·L0 - 4·L(1) + L(2)) / (L(2) - 2·L(1) + L0)``.  R² is then 1 by
      construction (two equations, two unknowns: the official gate never fires).
      For five points {-2..2} least squares is *not* the 4th-order stencil (A.2);
      both agree when the losses are exactly quadratic (the stencil is the
      derivative of the quartic interpolant, which no single weighted least-squares
      fit of a parabola reproduces), and least squares is what Algorithm 1 means.

    R² is ``1 - SS_res/SS_tot`` over *all* given points including ``s = 0``, with
    ``SS_res = Σ (ΔL_i - ((a/2)·s_i² - β·s_i))²`` and ``SS_tot = Σ (ΔL_i - mean(ΔL))²``
    (what ``sklearn.metrics.r2_score(ΔL, prediction)`` computes).  A fit is
    ``degenerate`` when the design has too few distinct non-zero points or every
    ΔL is identical (then R² is None).
    """
    s = [float(x) for x in points]
    dl = [float(x) - float(l0) for x in losses]
    if len(s) != len(dl):
        raise ValueError(f"points and losses differ in length: {len(s)} vs {len(dl)}")
    s4 = sum(x**4 for x in s)
    if beta is not None:
        if s4 == 0.0:
            return ParabolaFit(math.nan, float(beta), None, True)
        a = 2.0 * sum(x * x * (y + beta * x) for x, y in zip(s, dl)) / s4
        b = float(beta)
    else:
        # columns u = s²/2 (coefficient a) and v = -s (coefficient β)
        suu = s4 / 4.0
        svv = sum(x * x for x in s)
        suv = -sum(x**3 for x in s) / 2.0
        det = suu * svv - suv * suv
        if not det > 1e-12 * suu * svv:
            return ParabolaFit(math.nan, math.nan, None, True)
        suy = sum(x * x / 2.0 * y for x, y in zip(s, dl))
        svy = -sum(x * y for x, y in zip(s, dl))
        a = (svv * suy - suv * svy) / det
        b = (suu * svy - suv * suy) / det
    r2 = r_squared(s, dl, a, b)
    return ParabolaFit(a, b, r2, r2 is None)


def r_squared(points: Sequence[float], dl: Sequence[float], a: float, beta: float) -> float | None:
    """``1 - SS_res/SS_tot`` of the parabola ``(a/2)s² - βs`` against ``ΔL``; None if flat."""
    # x * x, not x ** 2: a float's ** raises OverflowError where * gives inf (then rejected as non-finite)
    mean = sum(dl) / len(dl)
    ss_tot = sum((y - mean) * (y - mean) for y in dl)
    if not ss_tot > 0.0:
        return None
    residuals = [y - (0.5 * a * x * x - beta * x) for x, y in zip(points, dl)]
    return 1.0 - sum(e * e for e in residuals) / ss_tot


def fits_well(fit: ParabolaFit, min_r2: float | None) -> bool:
    """The R² test of line 8: R² ≥ ``min_r2`` (passes when ``min_r2`` is None or R² is undefined)."""
    return min_r2 is None or fit.r2 is None or fit.r2 >= min_r2


def why_rejected(fit: ParabolaFit, finite: bool, min_r2: float | None) -> str | None:
    """Algorithm 1 line 8 as a verdict: None to accept, else the first failed test.

    Order matters only for the message: non-finite data makes everything else
    meaningless, a degenerate design has no a or β, then convexity (a > 0), descent
    (β > 0) and goodness of fit (R² ≥ min_r2; skipped when ``min_r2`` is None or
    R² is not defined, as in exact mode).
    """
    if not finite:
        return "nonfinite"
    if fit.degenerate:
        return "degenerate"
    if not (math.isfinite(fit.a) and math.isfinite(fit.beta)):
        return "nonfinite"
    if not fit.a > 0.0:
        return "curvature<=0"
    if not fit.beta > 0.0:
        return "slope<=0"
    if not fits_well(fit, min_r2):
        return "r2"
    return None


def horizon_factor(horizon: str | None, t: int, total_steps: int | None) -> float:
    """The T-dependent factor ``h_t`` of (C.1): 1, ``1 - t/T`` or ``(1 + cos(πt/T))/2``.

    1 when the run's length T (``total_steps``) is unknown; clipped at t = T, so the factor stays
    in [0, 1] when training runs past T.
    """
    if horizon in (None, "none") or total_steps is None:
        return 1.0
    x = min(max(t, 0), total_steps) / total_steps
    if horizon == "linear":
        return 1.0 - x
    if horizon == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * x))
    raise ValueError(f"horizon must be one of None, 'none', 'linear', 'cosine', got {horizon!r}")


def smoothed_ratio(
    s_star: float, smoothing: float, horizon: float, max_change: float | None
) -> float:
    """Lines 9-10 as a factor on the lr: ``r = η_new/η = γ + (1-γ)·s*·h``, clamped.

    ``η_new = γ·η + (1-γ)·η*·h`` divided by η; the clamp to
    ``[1/max_change, max_change]`` bounds what one noisy probe can do to the lr.
    """
    r = smoothing + (1.0 - smoothing) * s_star * horizon
    if max_change is not None:
        r = min(max(r, 1.0 / max_change), max_change)
    return r
