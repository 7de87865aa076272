"""The guard: rules beyond Algorithm 1 for ``probe="same"``, each acting on what this step's probes show
(fill: on the base optimizer's momentum).

The rules, numbered as the docs number them; each record of ``GeN.history`` has one flag per rule,
named after it, true when that rule changed this probe's decision:

1. backtrack (rejected fit): a probe inside the step rose above L0 along a descent direction: cut
   the step by safeguarded quadratic interpolation, re-probing (:func:`backtrack`);
2. cap (accepted fit): the parabola or a probe says the smoothed rate raises the loss: this step goes
   to the fitted minimiser (:func:`guarded_ratio`);
3. shrink: only R² rejected and the minimiser lies inside the step (:func:`shrunk_ratio`);
4. grow: a rejected fit whose curvature is within the loss's rounding (:func:`grown_ratio`);
   4b. concave: a well-fitted concave one that places no minimiser near the step (:func:`concave_ratio`);
5. keep: after a cap the lr falls by at most the clamp, staying below 2·s* (:func:`kept_ratio`);
6. recover: after a backtrack or shrink, an accepted fit may restore the cut rate at once
   (:func:`recovered_ratio`);
7. fill: while a heavy-ball momentum buffer is still filling, a rise of the lr is scaled down by how
   much the buffer alone will still lengthen the steps (:func:`filled_ratio`).

:meth:`genrun.gen.samebatch.SameBatch.decide` tests a rejected fit for grow first (a rise within
the loss's rounding is no rise), then backtrack, concave and shrink, and the first that acts
decides; an accepted fit gets line 9, then recover, cap and keep in turn; fill applies last, to
whatever raises the lr.

``GeN(guard=...)`` takes True (every rule), False (none: Algorithm 1's decisions) or a collection
of the rules' names (:data:`GUARD_RULES`, the words above), to measure what each rule adds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .fit import ParabolaFit, fits_well, smoothed_ratio
from .probe import ProbeScope, probe_losses

#: The rules by name, in the order above (4b, growth on a concave fit, is ``"concave"``).
GUARD_RULES = ("backtrack", "cap", "shrink", "grow", "concave", "keep", "recover", "fill")

#: Most extra probe forwards a backtrack spends on one step.
GUARD_TRIES = 8


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
    ``r = max_change`` (no rule without a clamp).  Resolvably negative curvature is
    evidence of a different kind, and grows more slowly (:func:`concave_ratio`).
    Returns ``(r, grown)``.
    """
    if reason not in ("curvature<=0", "degenerate", "r2") or max_change is None:
        return 1.0, False
    if not (fit.beta > 0.0 and math.isfinite(fit.beta) and math.isfinite(fit.a)):
        return 1.0, False
    reach = max((x * x for x in points), default=0.0)
    if not (reach > 0.0 and 0.5 * abs(fit.a) * reach <= resolution):  # no probes (exact mode): no rule
        return 1.0, False
    return max_change, True


def concave_ratio(
    fit: ParabolaFit, reason: str | None, smoothing: float, horizon: float, max_change: float | None,
    min_r2: float | None,
) -> tuple[float, bool]:
    """The guard for a fit rejected only for ``a ≤ 0``: grow slowly while the loss bends downward.

    A concave fit along a descent step (β > 0) that passes the R² gate says the loss falls
    faster than linearly over the probed steps: no minimiser lies anywhere near the step,
    the step is short.  Algorithm 1 keeps the rate, and a run that meets such fits probe
    after probe never moves — measured: a LoRA run from η0 held 5e-4 for all 50 steps
    (every probe ``|a|/β ≈ 0.005``) and ended at chance.  We move the lr up as an accepted
    fit with the same curvature magnitude would, ``r = γ + (1-γ)·h·β/|a|`` (line 9), never
    down (strong curvature, ``β/|a| ≤ 1``, keeps the rate as Algorithm 1 does), and at
    most by ``√max_change`` per probe: a concave fit bounds no step, so this is weaker
    evidence than a minimiser — growing by the full clamp let heavy-ball GeN-SGD double
    twice in eight steps on mnist5k and die.  Returns ``(r, grown)``.
    """
    if reason != "curvature<=0" or max_change is None:
        return 1.0, False
    if not (fit.beta > 0.0 and math.isfinite(fit.beta) and math.isfinite(fit.a) and fit.a < 0.0):
        return 1.0, False
    if not fits_well(fit, min_r2):
        return 1.0, False
    r = min(smoothed_ratio(fit.beta / -fit.a, smoothing, horizon, max_change), math.sqrt(max_change))
    return (r, True) if r > 1.0 else (1.0, False)


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


def filled_ratio(r: float, fill: float) -> float:
    """Rule 7: an lr rise ``r > 1`` becomes ``max(1, r·φ)`` while momentum's buffer is ``φ`` full.

    A probe measures the step just taken, and its multiplier s* says how much longer *that*
    step should have been.  With heavy-ball momentum the step is ``η·buf``, and while the
    buffer fills (``φ_n = buf_n/buf_∞ < 1``, :func:`~genrun.gen.search.momentum_fill`) the
    steps lengthen by ``1/φ_n`` at a fixed lr along a direction that persists: raising the
    lr by r as well lengthens the steps to come by ``r/φ_n``, not r.  The lr takes ``r·φ_n``,
    and a rise never turns into a cut (a direction that does not persist fills the buffer
    less).  Measured: heavy-ball GeN-SGD (μ = 0.9) on mnist5k's flat start doubled its lr on
    fits with s* = 17-36 over its first 20 steps, while the buffer alone grew its steps 9x,
    and the network died; with this rule the lr held at η0 for 16 steps and rose as the buffer
    filled, and the run ended at 97 %.  With μ = 0.9 the rule fades within ~40 steps (off from
    step 66); without momentum φ = 1 and it never acts.  n counts GeN's own steps: wrapped
    around an optimizer that has already stepped, GeN holds its first rises needlessly, which
    errs toward a smaller lr for a few probes.
    """
    if not r > 1.0 or fill >= 1.0:
        return r
    return max(1.0, r * fill)


def backtrack(
    closure: Callable[[], Any],
    place: Callable[[float], None],
    scope: ProbeScope,
    device: torch.device,
    r: float,
    l0: float,
    beta: float,
    reduce: Callable[[Tensor], float],
    tries: int,
) -> tuple[float, list[float], list[float]]:
    """The guard's line search after a rejected fit (:func:`~genrun.gen.fit.backtrack_ratio`).

    Probe the cut multiplier ``r`` and cut again (from L0 = ``l0`` and the slope ``beta``)
    while it still raises the loss, at most ``tries`` forwards (spent only when the
    probes already showed a rise).  ``reduce`` turns each loss into the number every
    rank agrees on.  Returns the final r and the multipliers and losses tried.
    """
    tried: list[float] = []
    seen: list[float] = []
    for _ in range(tries):
        value = probe_losses(closure, place, [r], scope, device)[0]
        loss_r = reduce(value.to(device=device, dtype=torch.float64).reshape(1))
        tried.append(r)
        seen.append(loss_r)
        r, cut = backtrack_ratio(r, [r], [loss_r], l0, beta)
        if not cut:
            break
    return r, tried, seen
