"""GeN(probe="next"), the next-batch estimator: its mechanics, not its tuned numbers.

A probe step δ = w_t - w_{t+1} (taken at lr η) is measured in two parts: its curvature
a = 2(L_B(1) - L0 + β_B) from one forward on its own batch B at once (a step that raised
B's loss is cut to β_B/a on the spot), and its held-out slope β' = a + Σ g'·δ from the next
call's gradient, where its record is made.  η* = η·β'/a.
"""

import io
import math

import pytest
import torch
from torch import nn

from genloop import (
    F64,
    NewtonDirection,
    gen_accumulated_call,
    gen_call,
    gen_train,
    loss_of,
    micro_batches,
    mse,
    quadratic,
)
from genrun.gen import GeN
from genrun.gen.nextbatch import Averages, decide, heavy_ball_reach


def exact_gen():
    return dict(probe="next", every=1, smoothing=0.0, max_change=None)


def train(gen, closure, calls):
    """``calls`` plain training steps; returns the gradient and the weights before each call."""
    params = [p for g in gen.param_groups for p in g["params"]]
    grads, weights = [], []

    def record():
        grads.append([p.grad.detach().clone() for p in params])
        weights.append([p.detach().clone() for p in params])

    gen_train(gen, closure, calls, before_step=record)
    return grads, weights


# ---------------------------------------------------------------- closed forms on a quadratic (3.1)
@pytest.mark.parametrize("lr", [0.01, 5.0])  # 5.0: the first step raises the loss and is cut
def test_eta_star_is_the_exact_step_along_the_gradient_of_the_step_it_measured(lr):
    h, c, w = quadratic()
    opt = torch.optim.SGD([w], lr=lr)
    gen = GeN(opt, **exact_gen())
    grads, weights = train(gen, loss_of(h, c, w), 10)
    assert [r["step"] for r in gen.history] == list(range(9))  # each made one call later
    assert (gen.history[0]["cut"] < 0.5) is (lr == 5.0)
    for rec in gen.history:
        g = grads[rec["step"]][0]
        eta = (g @ g / (g @ h @ g)).item()
        # deterministic: the held-out slope is the own batch's, so both estimates are η*
        assert rec["eta_star"] == pytest.approx(eta, rel=1e-9)
        assert rec["eta_own"] == pytest.approx(eta, rel=1e-9)
        assert rec["accepted"] and rec["reason"] is None and rec["resolved"]
        # A = dᵀHd and b = Gᵀd per unit lr of the step as taken (d = g for SGD)
        taken = rec["lr_before"] * rec["cut"]
        assert rec["A"] == pytest.approx((g @ h @ g).item(), rel=1e-9)
        assert rec["b"] == pytest.approx((g @ g).item(), rel=1e-9)
        assert rec["A"] == pytest.approx(rec["a_s"] / taken**2) and rec["b"] == pytest.approx(rec["beta_s"] / taken)
        assert rec["lr_after"] == pytest.approx(eta, rel=1e-9)  # ρ = 0, no clamp, no horizon
    # the measurement at call k sets the lr of call k's own base step
    for rec in gen.history:
        k = rec["step"] + 1
        if k < len(gen.history) and gen.history[k]["cut"] == 1.0:
            step = weights[k][0] - weights[k + 1][0]
            torch.testing.assert_close(step, rec["lr_after"] * grads[k][0], rtol=1e-12, atol=0.0)


def test_gradient_accumulation_measures_the_accumulated_gradient():
    w, micro, h = micro_batches()
    opt = torch.optim.SGD([w], lr=1e-3)
    gen = GeN(opt, **exact_gen())
    etas = []

    def eta_of_the_accumulated_gradient():
        gd = w.grad
        etas.append((gd @ gd / (gd @ h @ gd)).item())

    for _ in range(5):
        gen_accumulated_call(gen, micro, 2, before_step=eta_of_the_accumulated_gradient)
    assert len(gen.history) == 4
    for rec in gen.history:
        assert rec["eta_star"] == pytest.approx(etas[rec["step"]], rel=1e-9)


def test_newton_direction_gives_unit_step_prop_3_3():
    # η* = Gᵀd/dᵀHd = 1 for d = H⁻¹G, whatever lr took the step: η*/η = 1/η, and the lr becomes 1
    h, c, w = quadratic(seed=1)
    opt = NewtonDirection([w], h, lr=0.3)
    gen = GeN(opt, **exact_gen())
    train(gen, loss_of(h, c, w), 2)
    rec = gen.history[0]
    assert rec["lr_before"] == 0.3 and rec["cut"] == 1.0
    assert rec["eta_star"] == pytest.approx(1.0, rel=1e-9) and rec["eta_own"] == pytest.approx(1.0, rel=1e-9)
    assert gen.lr == pytest.approx(1.0, rel=1e-9)
    # call 2's step, at lr 1, is Newton's: it lands on the minimiser
    torch.testing.assert_close(w.detach(), torch.linalg.solve(h, c), rtol=1e-8, atol=1e-10)


def _trajectory(scale, lr, steps=10, **kwargs):
    h, c, w = quadratic(seed=2, scale=scale)
    opt = torch.optim.SGD([w], lr=lr)
    gen = GeN(opt, **{"probe": "next", **kwargs})
    _, weights = train(gen, loss_of(h, c, w), steps)
    return torch.stack([ws[0] for ws in weights[1:]] + [w.detach().clone()]), [r["lr_after"] for r in gen.history]


@pytest.mark.parametrize("kwargs", [exact_gen(), dict(every=1)], ids=["exact", "defaults"])
def test_gen_sgd_is_scale_invariant_given_a_scaled_initial_lr_remark_3_4(kwargs):
    # L → c·L scales GeN-SGD's η* by 1/c.  The first step is the base optimizer's, not rescaled
    # (no line 10), so the invariance holds from an initial lr scaled by 1/c as well: then every step
    # is the same and every lr 1/c times as large (the rounding threshold is relative to L0: unchanged).
    c = 1024.0  # a power of two: every product scales exactly
    ws, lrs = _trajectory(1.0, 0.05, **kwargs)
    ws_big, lrs_big = _trajectory(c, 0.05 / c, **kwargs)
    assert torch.equal(ws_big, ws)
    assert [x * c for x in lrs_big] == lrs and len(set(lrs)) > 3


# ---------------------------------------------------------------- resume while a step is held
def _resume_run(split=None, steps=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(steps, 16, 5, generator=g), torch.randn(steps, 16, generator=g)

    def build(seed, lr):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        return model, opt, GeN(opt, probe="next", every=2, smoothing=0.5)

    model, opt, gen = build(0, 0.02)
    held = None
    for t in range(steps):
        if t == split:  # the probe step of call t - 1 is held: its δ travels in the checkpoint
            buf = io.BytesIO()
            torch.save({"m": model.state_dict(), "o": opt.state_dict(), "g": gen.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)  # as genrun.checkpoint reads it
            held = saved["g"]["estimator"]["held"]
            model, opt, gen = build(99, 1.0)
            model.load_state_dict(saved["m"])
            opt.load_state_dict(saved["o"])
            gen.load_state_dict(saved["g"])
        gen_call(gen, mse(model, x[t], y[t]))
    return [p.detach() for p in model.parameters()], gen, held


def test_resume_while_a_step_is_held_is_bit_exact():
    params, gen, _ = _resume_run()
    params2, gen2, held = _resume_run(split=9)
    assert held is not None and held["deltas"]
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert gen2.lr == gen.lr and gen2.history == gen.history and len(gen.history) == 8
    assert len({r["lr_after"] for r in gen.history}) > 3


# ---------------------------------------------------------------- the cut
@pytest.mark.parametrize("diag,lr", [((2.0,), 1.5), ((1.0, 4.0), 0.75)])  # lr·h_max = 3
def test_a_step_that_raises_its_own_batch_loss_is_cut_to_its_parabola_minimum(diag, lr):
    h = torch.diag(torch.tensor(diag, dtype=F64))
    w = torch.ones(len(diag), dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr)
    gen = GeN(opt, probe="next", every=1)
    f = lambda: 0.5 * w @ h @ w  # noqa: E731
    w_t, grads = w.detach().clone(), []
    loss = gen_call(gen, f, before_step=lambda: grads.append(w.grad.clone()))
    (g,) = grads
    delta = lr * g
    assert 0.5 * (w_t - delta) @ h @ (w_t - delta) > loss.item()  # the base step raised B's loss
    r = ((g @ delta) / (delta @ h @ delta)).item()  # β_B/a: 1/3 on the 1-D problem
    torch.testing.assert_close(w.detach(), w_t - r * delta, rtol=1e-12, atol=1e-15)
    assert gen.lr == pytest.approx(lr * r, rel=1e-12)  # the lr is cut with the step, at this call
    if len(diag) == 1:
        assert r == pytest.approx(1 / 3, rel=1e-12)
    gen_call(gen, f, loss=False)
    rec = gen.history[0]
    assert rec["cut"] == pytest.approx(r, rel=1e-12) and rec["lr_before"] == lr
    assert rec["delta_norm"] == pytest.approx(r * delta.norm().item(), rel=1e-12)  # the step as taken


# ---------------------------------------------------------------- the rules, end to end
@pytest.mark.parametrize("lr", [1e-9, 1e-7])
def test_from_a_tiny_lr_the_lr_grows_by_max_change_per_probe(lr):
    # float32 least squares far below η*: the curvature term (a/2) is within the loss's rounding
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=g), torch.randn(256, generator=g)

    def run(**kwargs):
        torch.manual_seed(0)
        model = nn.Linear(8, 1)
        gen = GeN(torch.optim.SGD(model.parameters(), lr=lr), every=1, **{"probe": "next", **kwargs})
        train(gen, lambda: ((model(x).squeeze(1) - y) ** 2).mean() + 10.0, 12)
        return gen

    gen = run()
    assert len(gen.history) == 11
    assert all(r["reason"] == "unresolved" and not r["resolved"] and not r["accepted"] for r in gen.history)
    assert all(r["cut"] == 1.0 and r["ratio"] == 2.0 for r in gen.history)
    assert gen.lr == lr * 2**11
    assert run(max_change=4.0).lr == lr * 4**11
    assert run(max_change=None).lr == lr  # nothing to grow by: hold
    # Algorithm 1's probes cannot tell such a step's curvature from rounding: they never climb
    stuck = run(probe="same", guard=False)
    assert not any(r["accepted"] for r in stuck.history) and stuck.lr == lr


def test_a_direction_that_does_not_descend_on_the_next_batch_holds_the_lr():
    # two batches pulling opposite ways: each step descends on its own batch, ascends on the next
    w = torch.zeros(1, dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    gen = GeN(opt, probe="next", every=1)

    def pulled_to(target):
        return lambda: 0.5 * ((w - target) ** 2).sum()

    for t in range(8):
        gen_call(gen, pulled_to(1.0 if t % 2 == 0 else -1.0))
    assert len(gen.history) == 7 and gen.lr == 0.1
    for rec in gen.history:
        assert rec["reason"] == "no_descent" and not rec["accepted"] and rec["resolved"]
        assert rec["beta_own"] > 0 > rec["beta_s"] and rec["b"] < 0 and rec["lr_after"] == 0.1


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_the_lr_is_the_smaller_of_the_own_batch_and_reach_times_held_out_eta(momentum):
    # noisy batches: the own batch's slope exceeds the held-out one; with ρ = 0 and no clamp the lr
    # after each accepted measurement is min(η*_B, (1 + μ)·η*')
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 8, 5, generator=g, dtype=F64), torch.randn(4, 8, generator=g, dtype=F64)
    w = torch.zeros(5, dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.05, momentum=momentum)
    gen = GeN(opt, **exact_gen())

    def batch(i):
        return lambda: 0.5 * ((x[i] @ w - y[i]) ** 2).mean()

    for t in range(12):
        gen_call(gen, batch(t % 4))
    reach = 1.0 + momentum
    accepted = [r for r in gen.history if r["accepted"]]
    assert len(accepted) >= 5
    for rec in accepted:
        target = min(rec["eta_own"], reach * rec["eta_star"])
        assert rec["lr_after"] == pytest.approx(target, rel=1e-12) and rec["eta_avg"] == pytest.approx(target)
    assert any(reach * r["eta_star"] < r["eta_own"] for r in accepted)  # the held-out bound binds
    if momentum:  # ... where plain min(η*_B, η*') would have been lower
        assert any(r["eta_star"] < r["lr_after"] for r in accepted)


@pytest.mark.parametrize("horizon", ["linear", "cosine"])
def test_horizon_scales_the_accepted_target(horizon):
    h, c, w = quadratic(seed=6)
    opt = torch.optim.SGD([w], lr=0.01)
    gen = GeN(opt, horizon=horizon, total_steps=8, **exact_gen())
    train(gen, loss_of(h, c, w), 5)
    assert len(gen.history) == 4
    for rec in gen.history:
        t = rec["step"]
        factor = 1 - t / 8 if horizon == "linear" else (1 + math.cos(math.pi * t / 8)) / 2
        assert rec["horizon"] == pytest.approx(factor)
        assert rec["lr_after"] == pytest.approx(rec["eta_star"] * factor, rel=1e-9)


# ---------------------------------------------------------------- decide, Averages, reach by hand
def avg(b=1.0, b_own=1.0, A=1.0, count=1):
    return Averages(b=b, b_own=b_own, A=A, count=count)


def test_heavy_ball_reach():
    p = [torch.zeros(1, requires_grad=True)]
    assert heavy_ball_reach(torch.optim.SGD(p, lr=0.1, momentum=0.9).param_groups) == pytest.approx(1.9)
    assert heavy_ball_reach(torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True).param_groups) == pytest.approx(1.9)
    assert heavy_ball_reach(torch.optim.SGD(p, lr=0.1, momentum=0.0).param_groups) == 1.0
    assert heavy_ball_reach(torch.optim.SGD(p, lr=0.1).param_groups) == 1.0
    assert heavy_ball_reach(torch.optim.Adam(p, lr=0.1).param_groups) == 1.0
    assert heavy_ball_reach(torch.optim.RMSprop(p, lr=0.1, momentum=0.5).param_groups) == pytest.approx(1.5)
    q = [torch.zeros(1, requires_grad=True)]
    groups = torch.optim.SGD([{"params": p, "momentum": 0.5}, {"params": q}], lr=0.1).param_groups
    assert heavy_ball_reach(groups) == pytest.approx(1.5)  # the largest group's


def test_averages_eta_is_the_smaller_of_own_and_reach_times_held_out():
    a = avg(b=1.0, b_own=3.0, A=2.0)
    assert a.eta() == pytest.approx(0.5)             # min(3, 1)/2
    assert a.eta(1.9) == pytest.approx(0.95)         # min(3, 1.9)/2
    assert avg(b=1.0, b_own=1.5, A=1.0).eta(1.9) == pytest.approx(1.5)  # the own batch's binds
    assert math.isnan(Averages().eta()) and math.isnan(avg(A=0.0).eta())
    # exponential averages of the ingredients, ratios without bias correction
    e = Averages()
    e.add(2.0, 4.0, 1.0, 0.9)
    assert e.count == 1 and e.eta() == pytest.approx(2.0) and e.eta(3.0) == pytest.approx(4.0)
    e.add(1.0, 1.0, 3.0, 0.9)
    assert (e.b, e.b_own, e.A) == pytest.approx((0.9 * 0.2 + 0.1, 0.9 * 0.4 + 0.1, 0.9 * 0.1 + 0.3))
    assert e.eta() == pytest.approx(0.28 / 0.39)


def test_decide_walks_the_rules_in_order():
    # 1. unresolved: grow by max_change if it descends on its own batch, else hold
    assert decide(avg(), 0.1, 1.0, 1.0, 2.0, resolved=False, descends=True) == (0.2, "unresolved")
    assert decide(avg(), 0.1, 1.0, 1.0, 2.0, resolved=False, descends=False) == (0.1, "unresolved")
    assert decide(avg(), 0.1, 1.0, 1.0, None, resolved=False, descends=True) == (0.1, "unresolved")
    assert decide(avg(b=-1.0, A=-1.0), 0.1, 1.0, 1.0, 2.0, resolved=False, descends=True) == (0.2, "unresolved")
    # 2. no_descent: b̄ ≤ 0 (before the curvature's sign)
    assert decide(avg(b=0.0), 0.1, 1.0, 1.0, 2.0, True, True) == (0.1, "no_descent")
    assert decide(avg(b=-1.0, A=-1.0), 0.1, 1.0, 1.0, 2.0, True, True) == (0.1, "no_descent")
    assert decide(avg(b=math.nan), 0.1, 1.0, 1.0, 2.0, True, True) == (0.1, "no_descent")
    # 3. concave: Ā ≤ 0
    assert decide(avg(A=0.0), 0.1, 1.0, 1.0, 2.0, True, True) == (0.1, "concave")
    assert decide(avg(A=-1.0), 0.1, 1.0, 1.0, 2.0, True, True) == (0.1, "concave")
    # 4. accepted: h·min(η*_B, reach·η*'), within [lr/max_change, lr·max_change]
    assert decide(avg(), 0.8, 1.0, 1.0, 2.0, True, True) == (pytest.approx(1.0), None)
    assert decide(avg(), 0.1, 1.0, 1.0, 2.0, True, True) == (pytest.approx(0.2), None)      # clamped up
    assert decide(avg(), 10.0, 1.0, 1.0, 2.0, True, True) == (pytest.approx(5.0), None)     # clamped down
    assert decide(avg(), 0.1, 1.0, 1.0, None, True, True) == (pytest.approx(1.0), None)     # unclamped
    assert decide(avg(), 100.0, 1.0, 1.0, None, True, True) == (pytest.approx(1.0), None)
    assert decide(avg(), 0.8, 1.0, 0.5, 2.0, True, True) == (pytest.approx(0.5), None)      # horizon
    assert decide(avg(), 0.8, 1.0, 0.0, 2.0, True, True) == (pytest.approx(0.4), None)      # h = 0: the clamp
    assert decide(avg(), 0.8, 1.0, 0.0, None, True, True) == (0.0, None)
    # reach: η* of heavy ball's longer steps, still never beyond the own batch's
    assert decide(avg(b=1.0, b_own=3.0), 1.0, 1.9, 1.0, None, True, True) == (pytest.approx(1.9), None)
    assert decide(avg(b=1.0, b_own=3.0), 1.0, 1.0, 1.0, None, True, True) == (pytest.approx(1.0), None)
    assert decide(avg(b=1.0, b_own=1.2), 1.0, 1.9, 1.0, None, True, True) == (pytest.approx(1.2), None)


# ---------------------------------------------------------------- cost and mixed precision
@pytest.mark.parametrize("given,forwards", [(True, 3), (False, 6)])
def test_a_probe_costs_one_forward_and_its_measurement_none(given, forwards):
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.1), probe="next", every=4)
    calls = []

    def counted(t):  # GeN's own forwards, by call
        return lambda: calls.append(t) or (w**2).sum()

    for t in range(12):
        f = counted(t)
        loss = (w**2).sum()
        loss.backward()
        gen.step(f, loss=loss.detach() if given else None)
        gen.zero_grad()
    assert len(calls) == forwards and set(calls) == {0, 4, 8}  # L(1), and L(0) when loss is not given
    assert [r["step"] for r in gen.history] == [0, 4, 8]       # measured at calls 1, 5, 9: no forward


def _scaled_run(scale, unscale_first=False):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=g, dtype=F64)
    h = m @ m.T / 5 + 0.5 * torch.eye(5, dtype=F64)
    w = torch.randn(5, generator=g, dtype=F64).requires_grad_()
    opt = torch.optim.SGD([w], lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    gen = GeN(opt, probe="next", every=1, smoothing=0.0, max_change=None, scaler=scaler)
    gen_train(gen, lambda: 0.5 * w @ h @ w, 4, scaler=scaler,
              before_step=(lambda: scaler.unscale_(opt)) if unscale_first else None)
    return [r["eta_star"] for r in gen.history]


def test_grad_scaler_the_held_out_slope_uses_unscaled_gradients():
    plain = _scaled_run(None)
    scaled = _scaled_run(2.0**10)
    assert len(plain) == 3 and all(e is not None for e in plain)
    assert scaled == pytest.approx(plain, rel=1e-6)


def test_grad_scaler_gradients_unscaled_by_the_caller_are_not_unscaled_twice():
    assert _scaled_run(2.0**10, unscale_first=True) == pytest.approx(_scaled_run(None), rel=1e-6)


def cross_entropy(model, x, y):
    return lambda: nn.functional.cross_entropy(model(x), y)


def test_a_rise_within_the_loss_rounding_does_not_cut_the_step():
    # float32 cross-entropy far below η*: L_B(1) - L0 is a few ulps of either sign
    cuts = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(1024, 32, generator=g), torch.randint(0, 10, (1024,), generator=g)
        for lr in (1e-8, 1e-7, 3e-7):
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
            gen = GeN(torch.optim.SGD(model.parameters(), lr=lr), probe="next", every=1)
            train(gen, cross_entropy(model, x, y), 6)
            cuts += [(seed, lr, r["cut"]) for r in gen.history if not r["resolved"]]
    assert len(cuts) > 20
    assert [c for c in cuts if c[2] != 1.0] == []
