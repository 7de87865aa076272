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
from dataclasses import dataclass
from typing import Sequence

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
    if min_r2 is not None and fit.r2 is not None and not fit.r2 >= min_r2:
        return "r2"
    return None


def horizon_factor(horizon: str | None, t: int, total_steps: int | None) -> float:
    """The T-dependent factor ``h_t`` of (C.1): 1, ``1 - t/T`` or ``(1 + cos(πt/T))/2``.

    Clipped at t = T so the factor stays in [0, 1] when training runs past T.
    """
    if horizon in (None, "none"):
        return 1.0
    assert total_steps is not None
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


def guarded_ratio(
    r: float, fit: ParabolaFit, points: Sequence[float], losses: Sequence[float], l0: float
) -> tuple[float, bool]:
    """Cap ``r`` at ``s* = β/a`` when the probes already say that ``r`` raises the loss.

    For an *accepted* fit.  Smoothing (γ = 0.9) makes the lr lag η*: after η* drops,
    ``r = γ + (1-γ)s*`` can stay far above s*.  The fitted parabola predicts
    ``ΔL(r) = (a/2)r² - βr``, which is positive exactly when ``r > 2β/a = 2s*``: the
    step would end *above* L0 on the very batch we probed.  A probe at ``0 < s ≤ r``
    with ``L(s) > L0`` is direct evidence of the same (a step of length r passes
    through a point that is already worse).  In either case keeping the smoothed rate
    is known to overshoot, and the best step the probes support is the fitted
    minimiser s*, so we take that.  GeN applies it after the ``max_change`` clamp: the
    clamp bounds how far one noisy estimate may *move* the lr, the guard only ever
    lowers r, and only to what these probes support.  A rejected fit is handled by
    :func:`backtrack_ratio` instead.  Returns ``(r, guarded)``.
    """
    s_star = fit.s_star
    overshoot = 0.5 * fit.a * r * r - fit.beta * r > 0.0
    seen = any(0.0 < s <= r and loss > l0 for s, loss in zip(points, losses))
    if (overshoot or seen) and s_star < r:
        return s_star, True
    return r, False


#: Safeguard of one backtrack, as fractions of the trial multiplier that raised the loss:
#: the new multiplier lies in [0.1·s, 0.5·s] (Nocedal & Wright, Numerical Optimization,
#: 2nd ed., §3.5), so each backtrack at least halves the step and at most divides it by 10.
BACKTRACK_RANGE = (0.1, 0.5)


def backtrack_ratio(
    r: float, points: Sequence[float], losses: Sequence[float], l0: float, beta: float
) -> tuple[float, bool]:
    """The guard for a *rejected* fit: a backtracking line-search step from the probes.

    A fit is rejected (R², curvature, non-finite) most often precisely when the step is
    far outside the region where the loss is quadratic along d, i.e. when it is too
    long; keeping the rate then (r = 1) is what lets a run diverge.  If a probe at
    ``0 < s ≤ r`` has ``L(s) > L0`` (or is not finite), the step at r is known to
    raise the loss.  The new multiplier is the minimiser of the quadratic that matches
    L0, the slope ``-β`` at 0 (exact with ``slope=True``) and L(s)
    (Nocedal & Wright (3.57)): ``s·β·s / (2·(L(s) - L0 + β·s))`` — always below s/2 —
    kept in ``BACKTRACK_RANGE``·s (0.1·s when L(s) is not finite).  The smallest such s
    is used (the shortest trial already shown to be too long).  Only for a descent
    direction (β > 0, finite): then a short enough step provably lowers the loss.  With
    β ≤ 0 no step length along d does (momentum and adaptive updates are sometimes not
    descent directions for the current batch), and cutting the lr would only collapse
    it — measured: GeN-Adam's lr fell to 1e-8 and stalled on Rosenbrock and Beale — so
    the rate is kept, as Algorithm 1 does for a rejected fit.  Returns
    ``(r, guarded)``; unchanged when no probe shows a rise.
    """
    if not (math.isfinite(l0) and math.isfinite(beta) and beta > 0.0):
        return r, False
    raising = [(s, loss) for s, loss in zip(points, losses) if 0.0 < s <= r and not loss <= l0]
    if not raising:
        return r, False
    s, loss = min(raising)
    lo, hi = BACKTRACK_RANGE[0] * s, BACKTRACK_RANGE[1] * s
    new = beta * s * s / (2.0 * (loss - l0 + beta * s)) if math.isfinite(loss) else lo
    return min(max(new, lo), hi), True


def shrunk_ratio(fit: ParabolaFit, reason: str | None, max_change: float | None) -> tuple[float, bool]:
    """The guard for a fit that only the R² gate rejected: shrink to the fitted minimiser.

    The loss along d has stopped looking like a parabola over the probed steps
    ``s ∈ [min(points), max(points)]``: the step is longer than the region where the
    local quadratic model (3.1) holds, the situation in which a trust-region method
    shrinks its radius.  Algorithm 1 keeps the rate (r = 1) and so keeps taking the step
    that left the model's region — measured on mnist5k (README): heavy-ball GeN-SGD's
    lr climbed to ~0.5 on the flat start, the R² gate then rejected for tens of steps
    while the loss blew up, and the network died.  If the rejected parabola is still
    convex with descent (a > 0, β > 0) and its minimiser lies inside the step
    (``s* = β/a < 1``), the probes support a shorter step, and we take it directly, not
    smoothed (smoothing averages noisy estimates of a good model; here the model
    itself failed): ``r = max(s*, 1/max_change)``.  The rate only ever goes down
    here, so a noisy rejection cannot raise it.  Returns ``(r, shrunk)``.
    """
    if reason != "r2" or not (fit.a > 0.0 and fit.beta > 0.0):
        return 1.0, False
    s_star = fit.s_star
    if not s_star < 1.0:
        return 1.0, False
    floor = 1.0 / max_change if max_change is not None else 0.0
    return max(s_star, floor), True


#: Rounding resolution of a probe loss, in units of its dtype's eps times |L0|.  Measured on
#: the offline tasks (float32 cross-entropy, batch 64): at lrs where the step is far too short
#: to feel curvature, ``L(1) + L(-1) - 2·L0`` is at most ~6 eps·L0 and random in sign; real
#: curvature at ordinary lrs is hundreds of eps·L0 and more.
LOSS_ULPS = 16.0


def grown_ratio(
    fit: ParabolaFit, reason: str | None, points: Sequence[float], resolution: float,
    max_change: float | None,
) -> tuple[float, bool]:
    """The guard for a rejected fit whose curvature is below the loss's rounding: grow.

    When the step is so short that ``(a/2)·s²`` at the outermost probe is within the
    rounding ``resolution`` of the loss, the probes carry no curvature: a's sign is
    noise (about half such fits pass the gate with a huge ``s* = β/a``, hence
    ``r = max_change``, and the rest fail it for ``a ≤ 0`` or R²), and when every probe
    rounds to L0 the fit is degenerate.  Algorithm 1 keeps the rate on the failures,
    so a run started from a tiny η0 climbs at half the rate the clamp allows (C.4.1),
    and an apparent rise of L(1) above L0 is rounding too, not a reason to backtrack.
    For a descent step (β > 0) we take what an accepted fit with ``s* → ∞`` gives:
    ``r = max_change`` (no rule without a clamp).  Curvature that is resolvably
    negative keeps the rate, as Algorithm 1 does: growing there was measured to drive
    heavy-ball GeN-SGD into divergence on the flat start (README).  Returns
    ``(r, grown)``.
    """
    if reason not in ("curvature<=0", "degenerate", "r2") or max_change is None:
        return 1.0, False
    if not (fit.beta > 0.0 and math.isfinite(fit.beta) and math.isfinite(fit.a)):
        return 1.0, False
    reach = max((x * x for x in points), default=0.0)
    if not (reach > 0.0 and 0.5 * abs(fit.a) * reach <= resolution):  # no probes (exact mode): no rule
        return 1.0, False
    return max_change, True


def kept_ratio(r: float, max_change: float | None) -> float:
    """The lr's share of an accepted fit's cap ``r = s*``: ``min(max(s*, 1/max_change), 2·s*)``.

    :func:`guarded_ratio` caps *this step* at the fitted minimiser s*, which may be far
    below the smoothed rate; but one batch's overshoot along d is weak evidence about
    the rate of the next steps (with momentum, d carries old gradients past the
    minimum along the current batch's direction).  Keeping the whole cap in the lr let
    heavy-ball GeN-SGD's lr fall 4-7x in one probe and crawl back at ``γ + (1-γ)s*``
    per probe (README, GeN-SGD on mnist5k), so the lr falls by at most the clamp, like
    any accepted update — but never stays above ``2·s*``, where the fitted parabola says
    a step raises the loss: the ``every - 1`` steps until the next probe run unguarded
    at this lr (with the clamp alone, GeN-SGD from lr 1-5 diverged on Rosenbrock within
    three steps).  A backtrack after a *rejected* fit keeps its whole cut: there the
    step left the quadratic region and raised the loss (a trust region shrinks).
    """
    return r if max_change is None else min(max(r, 1.0 / max_change), 2.0 * r)


def recovered_ratio(r: float, s_star: float, horizon: float, max_change: float | None, ceiling: float) -> float:
    """After the guard cut the rate, an accepted fit may restore it without smoothing.

    ``ceiling`` is ``η_cut/η``, the rate before the latest backtrack or shrink (rules 1
    and 3) over the current one; GeN never puts η_cut above the rate its latest accepted
    fit chose (the caller's η0, or a rate rule 4 grew to, is no rate to return to:
    restoring a 10x too high η0 killed a network, README).  Those cuts answer one batch
    whose step left the quadratic region, and the lr keeps them; but smoothing then brings the rate back
    at only ``γ + (1-γ)·s*`` per probe (1.1-1.5 for the s* = 2-6 seen after a cut), so
    heavy-ball GeN-SGD spent the rest of a run 3-10x below the rate it had before
    (README, mnist5k).  While the rate is below the ceiling, an accepted fit whose
    minimiser lies beyond the step moves straight to it:
    ``r = max(r, min(s*·h, max_change, ceiling))`` — never beyond the fitted minimiser,
    the clamp, or the rate that was cut.  Returns the (possibly raised) ratio.
    """
    if not ceiling > 1.0:
        return r
    cap = ceiling if max_change is None else min(ceiling, max_change)
    return max(r, min(s_star * horizon, cap))
