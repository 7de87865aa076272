"""GeN must not make a run diverge: Algorithm 1's failure on Beale, reproduced, and the default estimator's cut.

A plain Algorithm 1 (probes at {-1, 0, 1}, parabola through them, γ-smoothing, lr clamp ×2)
diverges on Beale from (1, 1.5) with γ = 0.9 while γ = 0 converges: the smoothed rate lags a
falling η*, and steps at rates the probes have just shown to raise the loss. GeN's default
estimator (probe="next") cuts a step that raised its own batch's loss on the spot, and with it
the lr. All synthetic.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from genloop import F64, gen_call
from genrun.gen import GeN
from genrun.gen.guard import BACKTRACK_RANGE, backtrack_ratio
from genrun.tasks.synthetic import Beale, Rosenbrock


def _beale(x: float, y: float) -> float:
    t1, t2, t3 = 1.5 - x + x * y, 2.25 - x + x * y * y, 2.625 - x + x * y * y * y
    return t1 * t1 + t2 * t2 + t3 * t3


def _beale_grad(x: float, y: float) -> tuple[float, float]:
    t1, t2, t3 = 1.5 - x + x * y, 2.25 - x + x * y * y, 2.625 - x + x * y * y * y
    gx = 2 * t1 * (y - 1) + 2 * t2 * (y * y - 1) + 2 * t3 * (y**3 - 1)
    gy = 2 * t1 * x + 4 * t2 * x * y + 6 * t3 * x * y * y
    return gx, gy


def plain_algorithm_1(gamma: float, lr: float = 1e-3, iters: int = 1000) -> dict:
    """Algorithm 1 on Beale with gradient descent, Φ = 1, points {-1, 0, 1}, clamp ×2.

    Returns how it ended and how often it stepped at a rate whose probe at the current
    rate had already shown a rise (L(w - ηd) > L(w)).
    """
    x, y = 1.0, 1.5
    blind = 0
    for t in range(iters):
        gx, gy = _beale_grad(x, y)
        l0 = _beale(x, y)
        try:
            lm, lp = _beale(x + lr * gx, y + lr * gy), _beale(x - lr * gx, y - lr * gy)
        except OverflowError:
            return {"diverged": True, "at": t, "blind": blind}
        curv, slope = lp - 2 * l0 + lm, lm - lp
        if curv > 0 and slope > 0:  # accepted: the parabola's minimiser s* = η*/η (line 8)
            s_star = 0.5 * slope / curv
            r = min(max(gamma + (1 - gamma) * s_star, 0.5), 2.0)
            if r > 2 * s_star:  # the fitted parabola says L(w - r·ηd) > L(w): a known rise
                blind += 1
            lr *= r
        x, y = x - lr * gx, y - lr * gy
        f = _beale(x, y) if abs(x) < 1e6 and abs(y) < 1e6 else math.inf
        if not f < 1e10:
            return {"diverged": True, "at": t, "blind": blind}
    return {"diverged": False, "f": _beale(x, y), "blind": blind}


def test_plain_algorithm_1_diverges_on_beale_with_smoothing_and_converges_without():
    smooth = plain_algorithm_1(gamma=0.9)
    direct = plain_algorithm_1(gamma=0.0)
    assert smooth["diverged"] and smooth["at"] < 1000
    assert smooth["blind"] > 0  # it stepped where its own probes predicted a rise
    assert not direct["diverged"] and direct["f"] < 1e-8


def _run(task, opt_factory, iters: int = 1000, make=GeN, **gen_kwargs) -> dict:
    w = torch.nn.Parameter(torch.tensor(task.start, dtype=torch.float32))
    opt = opt_factory([w])
    gen = make(opt, **gen_kwargs)
    for t in range(iters):
        if not torch.isfinite(gen_call(gen, lambda: task.value(w), finite_only=True)):
            return {"diverged": True, "at": t, "gen": gen}
    return {"diverged": False, "f": float(task.value(w.detach())), "gen": gen}


@pytest.mark.parametrize("lr", [1e-4, 1e-3, 1e-2])
def test_gen_same_batch_reproduces_the_plain_failure(lr):
    # GeN's same-batch probes configured as the plain algorithm: parabola through the 3 probes,
    # no R² gate, Φ = 1, clamp ×2
    plain = dict(probe="same", every=1, slope=False, min_r2=None, max_change=2.0, guard=False)
    sgd = lambda p: torch.optim.SGD(p, lr=lr)  # noqa: E731
    assert _run(Beale(), sgd, **plain, smoothing=0.9)["diverged"]
    direct = _run(Beale(), sgd, **plain, smoothing=0.0)
    assert not direct["diverged"] and direct["f"] < 1e-6
    # Algorithm 1 as printed (no clamp at all) with γ = 0.9 diverges too
    assert _run(Beale(), sgd, make=GeN.algorithm1, every=1, smoothing=0.9)["diverged"]


@pytest.mark.parametrize("task", [Rosenbrock(), Beale()], ids=["rosenbrock", "beale"])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_next_batch_gen_sgd_from_sgds_default_lr_converges_where_same_batch_diverges(task, momentum):
    # conf/optim/sgd.yaml's lr 0.05: the first step is far too long. Same-batch probes (Φ = 4, γ = 0.9,
    # exact slope, R² gate) reject its fit and keep the rate: diverged within a few steps. The default
    # estimator sees the first step raise its own batch's loss and cuts it (and the lr) on the spot.
    start = float(task.value(torch.tensor(task.start)))
    sgd = lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum)  # noqa: E731
    assert _run(task, sgd, iters=50, probe="same", guard=False)["diverged"]
    run = _run(task, sgd, probe="next")
    assert not run["diverged"] and run["f"] < 0.01 * start
    first = run["gen"].history[0]
    assert first["step"] == 0 and first["l1"] > first["l0"] and 0.0 < first["cut"] < 0.5
    # the record's a and β_B are of the step as taken (cut to B's parabola minimum: slope = curvature there);
    # l0, l1 of the step as the base optimizer proposed it, r times longer
    r = first["cut"]
    assert first["beta_own"] == pytest.approx(first["a_s"], rel=1e-9)
    assert first["l1"] - first["l0"] == pytest.approx(first["a_s"] / (2 * r * r) - first["beta_own"] / r, rel=1e-6)


@pytest.mark.parametrize("lr", [1e-4, 1e-3, 1e-2])
def test_gen_reproduces_the_plain_failure_and_the_guard_removes_it(lr):
    # GeN configured as the plain algorithm: parabola through the 3 probes, no R² gate, Φ = 1
    plain = dict(every=1, slope=False, min_r2=None, max_change=2.0)
    sgd = lambda p: torch.optim.SGD(p, lr=lr)  # noqa: E731
    assert _run(Beale(), sgd, **plain, smoothing=0.9, guard=False)["diverged"]
    assert not _run(Beale(), sgd, **plain, smoothing=0.0, guard=False)["diverged"]
    guarded = _run(Beale(), sgd, **plain, smoothing=0.9, guard=True)
    assert not guarded["diverged"] and guarded["f"] < 1e-6



@pytest.mark.parametrize("task", [Rosenbrock(), Beale()], ids=["rosenbrock", "beale"])
def test_default_gen_sgd_from_its_default_lr_diverges_unguarded_and_converges_guarded(task):
    # GeN's defaults (Φ = 4, γ = 0.9, exact slope, R² gate) from conf/optim/sgd.yaml's lr 0.05,
    # with its heavy-ball momentum 0.9 and without: the first step is far too long, its fit is
    # rejected, so only a guard that also acts on rejected fits can stop it. (With momentum
    # the buffer still throws the iterate after the cut step: on Beale it lands on the
    # plateau near x1 = 0 — finite, below the start, but not near the minimum.)
    start = float(task.value(torch.tensor(task.start)))
    for momentum in (0.9, 0.0):
        sgd = partial(torch.optim.SGD, lr=0.05, momentum=momentum)
        assert _run(task, sgd, iters=50, guard=False)["diverged"]
        guarded = _run(task, sgd, guard=True)
        assert not guarded["diverged"] and guarded["f"] < 0.5 * start
        backtracked = [r for r in guarded["gen"].history if "guard_points" in r]
        assert backtracked and all(r["backtrack"] and not r["accepted"] for r in backtracked)
    # plain gradient descent (momentum 0), the paper's setting: converges on both
    assert guarded["f"] < 0.01 * start



@pytest.mark.parametrize("lr", [1.0, 5.0])
def test_a_capped_lr_stays_below_twice_the_minimiser(lr, monkeypatch):
    # From lr 1-5 on Rosenbrock the first fit is accepted with s* ~ 1e-9: this step is capped
    # at s*, and the three unprobed steps after it run at what the lr keeps. Halving only
    # (the clamp alone) diverges within them; at most 2·s* does not.
    sgd = lambda p: torch.optim.SGD(p, lr=lr)  # noqa: E731
    kept = _run(Rosenbrock(), sgd, iters=200, guard=True)
    first = kept["gen"].history[0]
    assert first["accepted"] and first["cap"] and first["lr_after"] <= 2 * first["ratio"] * lr
    assert not kept["diverged"]
    monkeypatch.setattr("genrun.gen.samebatch.kept_ratio", lambda r, max_change: max(r, 1.0 / max_change))
    assert _run(Rosenbrock(), sgd, iters=200, guard=True)["diverged"]



def test_backtrack_ratio_rules():
    lo, hi = BACKTRACK_RANGE
    # no probe above L0 at 0 < s <= r: nothing to do
    assert backtrack_ratio(1.0, [-1.0, 0.0, 1.0], [5.0, 1.0, 0.5], 1.0, 2.0) == (1.0, False)
    # quadratic interpolation from L0 = 1, slope -β = -2 and L(1) = 2: a = 2·(1 + 2) = 6, s = β/a = 1/3
    r, cut = backtrack_ratio(1.0, [-1.0, 0.0, 1.0], [5.0, 1.0, 2.0], 1.0, 2.0)
    assert cut and r == pytest.approx(1 / 3)
    # a huge rise: interpolation says tiny, the safeguard keeps 0.1·s
    assert backtrack_ratio(1.0, [1.0], [1e30], 1.0, 2.0) == (pytest.approx(lo), True)
    # a non-finite probe: the lower end of the safeguard
    assert backtrack_ratio(1.0, [1.0], [math.inf], 1.0, 2.0) == (pytest.approx(lo), True)
    assert backtrack_ratio(1.0, [1.0], [math.nan], 1.0, 2.0) == (pytest.approx(lo), True)
    # never more than half of the failed trial
    assert backtrack_ratio(1.0, [1.0], [1.0 + 1e-12], 1.0, 2.0)[0] == pytest.approx(hi, rel=1e-6)
    # not a descent direction (β <= 0): shortening cannot help, the rate is kept
    assert backtrack_ratio(1.0, [1.0], [3.0], 1.0, -1.0) == (1.0, False)
    assert backtrack_ratio(1.0, [1.0], [3.0], 1.0, math.nan) == (1.0, False)
    # the probe beyond r says nothing about r
    assert backtrack_ratio(0.5, [1.0], [3.0], 1.0, 2.0) == (0.5, False)



def test_guard_reprobes_until_the_step_no_longer_raises_the_loss():
    # L = w⁴ from w = 1 at lr 1: the step lands at w = -3 (L = 81 > 1); the quartic is far
    # from a parabola, so the fit is rejected on R², and the guard backtracks and re-probes.
    w = torch.tensor([1.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=1.0), every=1, guard=True)
    loss = (w**4).sum()
    loss.backward()
    gen.step(lambda: (w**4).sum(), loss=loss.detach())
    rec = gen.history[-1]
    assert not rec["accepted"] and rec["backtrack"]
    assert rec["guard_points"][0] < 0.5 and len(rec["guard_points"]) == len(rec["guard_losses"])
    assert rec["guard_losses"][-1] <= 1.0  # the step finally taken does not raise L
    assert float((w.detach() ** 4).sum()) < 1.0
    assert gen.lr == pytest.approx(rec["ratio"])  # the lr keeps the cut
    # unguarded, the same step is kept at the rate that raised the loss
    v = torch.tensor([1.0], dtype=F64, requires_grad=True)
    plain = GeN(torch.optim.SGD([v], lr=1.0), every=1, guard=False)
    loss = (v**4).sum()
    loss.backward()
    plain.step(lambda: (v**4).sum(), loss=loss.detach())
    assert float((v.detach() ** 4).sum()) == pytest.approx(81.0)
