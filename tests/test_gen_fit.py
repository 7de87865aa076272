"""The pure arithmetic of Algorithm 1's probe: fit vs the paper's closed forms, gate, horizon, smoothing.

Convention: L(s) = L(w_t - s·δ), δ = η·d (s = 1 is the step the base optimizer took).
The paper writes L± := L(w_t ± η·d), i.e. its L+ is our L(-1) and its L- our L(1).
"""

import math
import random

import pytest

from genrun.gen.fit import ParabolaFit, fit_parabola, horizon_factor, smoothed_ratio, why_rejected
from genrun.gen.guard import concave_ratio, grown_ratio, guarded_ratio, kept_ratio, recovered_ratio, shrunk_ratio

SEEDS = range(20)


def _rand_losses(rng, n):
    return [rng.uniform(0.5, 3.0) for _ in range(n)]


@pytest.mark.parametrize("seed", SEEDS)
def test_three_points_slope_free_equals_lqa_3_5(seed):
    rng = random.Random(seed)
    l_minus1, l0, l_plus1 = _rand_losses(rng, 3)
    fit = fit_parabola((-1.0, 0.0, 1.0), (l_minus1, l0, l_plus1), l0)
    # (3.5) as printed, with the paper's L+ = L(w + ηd) = our L(-1), L- = our L(1)
    paper_plus, paper_minus = l_minus1, l_plus1
    lqa = 0.5 * (paper_plus - paper_minus) / (paper_plus - 2 * l0 + paper_minus)
    assert fit.s_star == pytest.approx(lqa, rel=1e-12)
    # and the curvature / slope are the central differences of A.3
    assert fit.a == pytest.approx(l_plus1 - 2 * l0 + l_minus1, rel=1e-12, abs=1e-12)
    assert fit.beta == pytest.approx((l_minus1 - l_plus1) / 2, rel=1e-12, abs=1e-12)
    # two equations, two unknowns: the paper's R² gate cannot fail here
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_forward_points_equal_a3_forward_difference(seed):
    rng = random.Random(seed)
    l0, l1, l2 = _rand_losses(rng, 3)
    # A.3 as printed, (0, η, 2η) with its L+ = L(w + ηd) = our s = -1, L+2 = our s = -2
    fit = fit_parabola((0.0, -1.0, -2.0), (l0, l1, l2), l0)
    assert fit.s_star == pytest.approx(0.5 * (4 * l1 - l2 - 3 * l0) / (l2 - 2 * l1 + l0), rel=1e-10)
    # the same stencil in the step direction, points (0, 1, 2)
    fit = fit_parabola((0.0, 1.0, 2.0), (l0, l1, l2), l0)
    assert fit.s_star == pytest.approx(0.5 * (3 * l0 - 4 * l1 + l2) / (l2 - 2 * l1 + l0), rel=1e-10)


def _a2(l_m2, l_m1, l0, l_p1, l_p2):
    """(A.2): 4th-order central stencils; s* = -f'(0)/f''(0) with f(s) = L(s)."""
    d1 = (l_m2 - 8 * l_m1 + 8 * l_p1 - l_p2) / 12
    d2 = (-l_m2 + 16 * l_m1 - 30 * l0 + 16 * l_p1 - l_p2) / 12
    return -d1 / d2, d2, -d1


@pytest.mark.parametrize("seed", SEEDS)
def test_five_points_equal_a2_on_parabolic_losses(seed):
    rng = random.Random(seed)
    a, beta, l0 = rng.uniform(0.1, 5), rng.uniform(-2, 2), rng.uniform(0, 3)
    pts = (-2.0, -1.0, 0.0, 1.0, 2.0)
    losses = [l0 + 0.5 * a * s * s - beta * s for s in pts]
    fit = fit_parabola(pts, losses, l0)
    s_a2, a_a2, beta_a2 = _a2(*losses)
    assert fit.s_star == pytest.approx(s_a2, rel=1e-10)
    assert (fit.a, fit.beta) == pytest.approx((a_a2, beta_a2), rel=1e-10, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_five_points_are_least_squares_not_the_a2_stencil(seed):
    """Least squares over {-2..2} is what Algorithm 1 means; (A.2) is the quartic
    interpolant's derivative.  They coincide only on parabolic data (test above)."""
    rng = random.Random(seed)
    l_m2, l_m1, l0, l_p1, l_p2 = _rand_losses(rng, 5)
    fit = fit_parabola((-2, -1, 0, 1, 2), (l_m2, l_m1, l0, l_p1, l_p2), l0)
    y = {-2: l_m2 - l0, -1: l_m1 - l0, 1: l_p1 - l0, 2: l_p2 - l0}
    # closed form of the anchored least squares on a symmetric design (columns decouple)
    beta = -(y[1] - y[-1] + 2 * (y[2] - y[-2])) / 10
    a = 2 * (y[1] + y[-1] + 4 * (y[2] + y[-2])) / 34
    assert (fit.a, fit.beta) == pytest.approx((a, beta), rel=1e-10, abs=1e-12)
    assert fit.r2 is not None and fit.r2 <= 1.0
    # a quartic term: (A.2) still recovers the exact derivatives at 0, least squares not
    q = [0.5 * 2.0 * s * s - 1.0 * s + 0.3 * s**4 for s in (-2, -1, 0, 1, 2)]
    _, a_a2, b_a2 = _a2(*q)
    assert (a_a2, b_a2) == pytest.approx((2.0, 1.0), rel=1e-12)
    assert fit_parabola((-2, -1, 0, 1, 2), q, 0.0).a != pytest.approx(2.0, rel=1e-3)


def test_slope_given_fits_only_curvature_and_r2_measures_the_slope_mismatch():
    pts, l0 = (-1.0, 0.0, 1.0), 1.0
    a, beta = 3.0, 0.7
    exact = [l0 + 0.5 * a * s * s - beta * s for s in pts]
    fit = fit_parabola(pts, exact, l0, beta=beta)
    assert (fit.a, fit.beta, fit.r2) == pytest.approx((a, beta, 1.0), rel=1e-12)
    # a cubic term leaves the curvature alone but makes the FD slope disagree with β
    cubic = [y + 0.5 * s**3 for y, s in zip(exact, pts)]
    fit = fit_parabola(pts, cubic, l0, beta=beta)
    assert fit.a == pytest.approx(a, rel=1e-12)
    assert fit.r2 < 0.99
    # without β, three points interpolate the cubic data exactly: R² = 1 regardless
    assert fit_parabola(pts, cubic, l0).r2 == pytest.approx(1.0, abs=1e-12)


def test_degenerate_designs():
    assert fit_parabola((0.0, 1.0), (1.0, 0.5), 1.0).degenerate  # one equation, two unknowns
    assert fit_parabola((-1.0, 0.0, 1.0), (1.0, 1.0, 1.0), 1.0).degenerate  # flat: no R²
    assert fit_parabola((0.0,), (1.0,), 1.0, beta=0.5).degenerate


def test_why_rejected_order_and_reasons():
    good = ParabolaFit(2.0, 1.0, 0.999, False)
    assert why_rejected(good, True, 0.99) is None
    assert why_rejected(good, False, 0.99) == "nonfinite"
    assert why_rejected(ParabolaFit(math.nan, math.nan, None, True), True, 0.99) == "degenerate"
    assert why_rejected(ParabolaFit(-1.0, 1.0, 1.0, False), True, 0.99) == "curvature<=0"
    assert why_rejected(ParabolaFit(1.0, -1.0, 1.0, False), True, 0.99) == "slope<=0"
    assert why_rejected(ParabolaFit(1.0, 1.0, 0.5, False), True, 0.99) == "r2"
    assert why_rejected(ParabolaFit(1.0, 1.0, 0.5, False), True, None) is None
    assert why_rejected(ParabolaFit(1.0, 1.0, None, False), True, 0.99) is None  # exact mode


def test_horizon_factors():
    assert horizon_factor(None, 7, None) == 1.0
    assert horizon_factor("cosine", 7, None) == 1.0  # the run's length unknown: no decay
    assert horizon_factor("none", 7, 10) == 1.0
    assert [horizon_factor("linear", t, 10) for t in (0, 5, 10, 20)] == pytest.approx([1, 0.5, 0, 0])
    cos = [horizon_factor("cosine", t, 8) for t in (0, 2, 4, 8, 9)]
    assert cos == pytest.approx([1, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0, 0], abs=1e-15)


def test_smoothed_ratio_and_clamp():
    assert smoothed_ratio(3.0, 0.0, 1.0, None) == 3.0
    assert smoothed_ratio(3.0, 0.9, 1.0, None) == pytest.approx(1.2)
    assert smoothed_ratio(3.0, 0.9, 0.5, None) == pytest.approx(1.05)
    assert smoothed_ratio(100.0, 0.0, 1.0, 2.0) == 2.0
    assert smoothed_ratio(1e-3, 0.0, 1.0, 2.0) == 0.5


def test_r_squared_of_huge_finite_losses_does_not_raise():
    from genrun.gen.fit import r_squared

    value = r_squared([-1.0, 1.0], [1e200, -1e200], 1.0, 1.0)  # squares overflow float64
    assert math.isnan(value)  # inf / inf: fails any min_r2 gate instead of raising


def test_guard_caps_at_minimiser_only_when_the_probes_show_overshoot():
    fit = ParabolaFit(1.0, 1.0, 1.0, False)  # s* = 1, loss rises again beyond s = 2
    assert guarded_ratio(2.5, fit, [], [], 0.0) == (1.0, True)
    assert guarded_ratio(1.5, fit, [], [], 0.0) == (1.5, False)
    # a probe at s <= r already above L0
    assert guarded_ratio(1.5, fit, [-1.0, 1.0], [3.0, 0.2], 0.1) == (1.0, True)
    assert guarded_ratio(0.8, fit, [], [], 0.0) == (0.8, False)



def test_shrunk_ratio_only_lowers_and_only_for_an_r2_rejection():

    inside = ParabolaFit(4.0, 1.0, 0.5, False)                      # s* = 0.25
    assert shrunk_ratio(inside, "r2", None) == (0.25, True)
    assert shrunk_ratio(inside, "r2", 2.0) == (0.5, True)           # never below 1/max_change
    assert shrunk_ratio(inside, "slope<=0", None) == (1.0, False)   # other rejections keep the rate
    assert shrunk_ratio(ParabolaFit(0.5, 1.0, 0.5, False), "r2", None) == (1.0, False)   # s* = 2: never raises
    assert shrunk_ratio(ParabolaFit(-1.0, 1.0, 0.5, False), "r2", None) == (1.0, False)  # concave: no minimiser



def test_grown_ratio_only_for_curvature_below_the_loss_resolution():
    pts = [-1.0, 0.0, 1.0]
    noise = ParabolaFit(-1e-7, 1e-3, 1.0, False)  # (|a|/2)·1² = 5e-8
    assert grown_ratio(noise, "curvature<=0", pts, 1e-7, 2.0) == (2.0, True)
    assert grown_ratio(noise, "curvature<=0", pts, 1e-8, 2.0) == (1.0, False)   # resolvable: Algorithm 1 keeps
    assert grown_ratio(noise, "curvature<=0", [-2.0, 0.0, 2.0], 1e-7, 2.0) == (1.0, False)  # 4x the reach
    assert grown_ratio(noise, "curvature<=0", pts, 1e-7, None) == (1.0, False)  # no clamp: nothing to grow to
    assert grown_ratio(noise, "r2", pts, 1e-7, 2.0) == (2.0, True)              # R² of rounding noise
    assert grown_ratio(ParabolaFit(0.0, 1e-3, None, True), "degenerate", pts, 1e-7, 2.0) == (2.0, True)
    assert grown_ratio(noise, "nonfinite", pts, 1e-7, 2.0) == (1.0, False)
    assert grown_ratio(ParabolaFit(0.0, 1e-3, None, False), "curvature<=0", [], 0.0, 2.0) == (1.0, False)  # exact
    ascent = ParabolaFit(-1e-7, -1e-3, 1.0, False)
    assert grown_ratio(ascent, "curvature<=0", pts, 1e-7, 2.0) == (1.0, False)  # not a descent step



def test_concave_ratio_moves_up_as_a_convex_fit_with_the_same_curvature_would():
    weak = ParabolaFit(-0.1, 1.0, 0.999, False)    # β/|a| = 10: r = 0.9 + 0.1·10 = 1.9 before the cap
    assert concave_ratio(weak, "curvature<=0", 0.9, 1.0, 2.0, 0.99) == (pytest.approx(math.sqrt(2.0)), True)
    assert concave_ratio(weak, "curvature<=0", 0.9, 1.0, 9.0, 0.99) == (pytest.approx(1.9), True)  # √9 = 3
    assert concave_ratio(weak, "curvature<=0", 0.9, 0.2, 9.0, 0.99) == (pytest.approx(1.1), True)  # × horizon
    mild = ParabolaFit(-0.5, 1.0, 0.999, False)    # β/|a| = 2: r = 1.1
    assert concave_ratio(mild, "curvature<=0", 0.9, 1.0, 2.0, 0.99) == (pytest.approx(1.1), True)
    strong = ParabolaFit(-4.0, 1.0, 0.999, False)  # β/|a| = 0.25: a convex fit would lower the lr; never here
    assert concave_ratio(strong, "curvature<=0", 0.9, 1.0, 2.0, 0.99) == (1.0, False)
    assert concave_ratio(ParabolaFit(-0.1, 1.0, 0.9, False), "curvature<=0", 0.9, 1.0, 2.0, 0.99) == (1.0, False)
    assert concave_ratio(ParabolaFit(-0.1, 1.0, 0.9, False), "curvature<=0", 0.9, 1.0, 2.0, None)[1]  # no R² gate
    assert concave_ratio(ParabolaFit(-0.1, -1.0, 0.999, False), "curvature<=0", 0.9, 1.0, 2.0, 0.99) == (1.0, False)
    assert concave_ratio(weak, "r2", 0.9, 1.0, 2.0, 0.99) == (1.0, False)          # other rejections: not this rule
    assert concave_ratio(weak, "curvature<=0", 0.9, 1.0, None, 0.99) == (1.0, False)  # no clamp: no rule


def test_kept_ratio_falls_by_at_most_the_clamp_and_stays_below_twice_the_minimiser():
    assert kept_ratio(0.3, 2.0) == 0.5       # the clamp: the lr halves at most
    assert kept_ratio(0.1, 2.0) == 0.2       # but never above 2·s*, where the parabola says L rises
    assert kept_ratio(1e-9, 2.0) == 2e-9
    assert kept_ratio(0.7, 2.0) == 0.7
    assert kept_ratio(0.1, None) == 0.1      # no clamp: the lr takes the whole cap



def test_recovered_ratio_moves_to_the_minimiser_within_the_clamp_and_the_cut_rate():
    assert recovered_ratio(1.3, 4.0, 1.0, 2.0, 1.0) == 1.3      # no cut to recover (at the ceiling)
    assert recovered_ratio(1.3, 4.0, 1.0, 2.0, 8.0) == 2.0      # the clamp
    assert recovered_ratio(1.3, 4.0, 1.0, None, 8.0) == 4.0     # no clamp: straight to s*
    assert recovered_ratio(1.05, 1.5, 1.0, 2.0, 8.0) == 1.5     # s*, where smoothing gives 0.9 + 0.1·1.5
    assert recovered_ratio(1.3, 4.0, 1.0, 2.0, 1.6) == 1.6      # the rate before the cut, not beyond
    assert recovered_ratio(1.3, 4.0, 0.25, 2.0, 8.0) == 1.3     # s*·h = 1: never below the smoothed rate
    assert recovered_ratio(0.95, 0.5, 1.0, 2.0, 8.0) == 0.95    # a minimiser inside the step: no raise
