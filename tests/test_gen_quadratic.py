"""GeN(probe="same") (Algorithm 1's probes) on L(w) = ½wᵀHw - cᵀw, where every quantity has a closed
form (float64).  The default estimator's closed forms are in test_gen_nextbatch.py."""

import pytest
import torch

from genloop import F64, NewtonDirection, gen_accumulated_call, gen_call, gen_train, loss_of, micro_batches, quadratic
from genrun.gen import GeN
from genrun.gen.guard import filled_ratio
from genrun.gen.search import FULL_BUFFER, lr_grid, momentum_echo, momentum_fill


def exact_gen():
    return dict(probe="same", every=1, smoothing=0.0, max_change=None)


def test_gen_sgd_picks_the_exact_step_along_the_gradient():
    h, c, w = quadratic()
    opt = torch.optim.SGD([w], lr=0.01)
    gen = GeN(opt, **exact_gen())
    f = loss_of(h, c, w)
    grads = []
    for _ in range(8):
        w0 = w.detach().clone()
        gen_call(gen, f, before_step=lambda: grads.append(w.grad.detach().clone()))
        g = grads[-1]
        eta = (g @ g / (g @ h @ g)).item()
        assert gen.lr == pytest.approx(eta, rel=1e-6)
        assert gen.history[-1]["accepted"] and gen.history[-1]["r2"] == pytest.approx(1.0, abs=1e-9)
        # line 10: the step just taken already uses η*
        torch.testing.assert_close(w.detach(), w0 - eta * g, rtol=1e-9, atol=1e-12)
    rec = gen.history[-1]
    assert rec["A"] == pytest.approx(rec["a_s"] / rec["lr_before"] ** 2)
    assert rec["b"] == pytest.approx(rec["beta_s"] / rec["lr_before"])


def test_newton_direction_gives_unit_step_prop_3_3():
    h, c, w = quadratic(seed=1)
    opt = NewtonDirection([w], h, lr=0.3)
    gen = GeN(opt, **exact_gen())
    gen_call(gen, loss_of(h, c, w))
    assert gen.lr == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(w.detach(), torch.linalg.solve(h, c), rtol=1e-8, atol=1e-10)


def _trajectory(scale, steps=6):
    h, c, w = quadratic(seed=2, scale=scale)
    opt = torch.optim.SGD([w], lr=0.05)
    gen = GeN(opt, **exact_gen())
    out = []
    gen_train(gen, loss_of(h, c, w), steps, after_step=lambda: out.append(w.detach().clone()))
    return torch.stack(out), gen.lr


def test_gen_sgd_update_is_scale_invariant_remark_3_4():
    ws, lr = _trajectory(1.0)
    ws_big, lr_big = _trajectory(1000.0)
    torch.testing.assert_close(ws_big, ws, rtol=1e-9, atol=1e-12)
    assert lr_big == pytest.approx(lr / 1000, rel=1e-9)


def _eta_stars(mode):
    h, c, w = quadratic(seed=3)
    opt = torch.optim.Adam([w], lr=0.05)
    gen = GeN(opt, probe="same", mode=mode, every=1, smoothing=0.5, max_change=None)
    gen_train(gen, loss_of(h, c, w), 6)
    return [r["eta_star"] for r in gen.history], [r["A"] for r in gen.history]


def test_exact_mode_agrees_with_fit_mode():
    fit_eta, fit_a = _eta_stars("fit")
    exact_eta, exact_a = _eta_stars("exact")
    assert exact_eta == pytest.approx(fit_eta, rel=1e-6)
    assert exact_a == pytest.approx(fit_a, rel=1e-6)


def test_gradient_accumulation_uses_the_accumulated_gradient():
    w, micro, h = micro_batches()
    opt = torch.optim.SGD([w], lr=1e-3)
    gen = GeN(opt, **exact_gen())
    grads = []
    for _ in range(4):
        gen_accumulated_call(gen, micro, 2, before_step=lambda: grads.append(w.grad.clone()))
        gd = grads[-1]
        assert gen.lr == pytest.approx((gd @ gd / (gd @ h @ gd)).item(), rel=1e-6)
        assert gen.history[-1]["r2"] == pytest.approx(1.0, abs=1e-9)


def test_init_search_picks_the_grid_lr_with_the_lowest_loss():
    h, c, w = quadratic(seed=5)
    w0 = w.detach().clone()
    opt = torch.optim.SGD([w], lr=1e-5)
    gen = GeN(opt, probe="same", init_search=True, every=1)
    f = loss_of(h, c, w)
    grads = []
    gen_call(gen, f, before_step=lambda: grads.append(w.grad.clone()))
    (g,) = grads
    values = [(0.5 * (w0 - e * g) @ h @ (w0 - e * g) - c @ (w0 - e * g)).item() for e in lr_grid()]
    best = lr_grid()[min(range(len(values)), key=values.__getitem__)]
    rec = gen.history[0]
    assert rec["reason"] == "init_search" and rec["accepted"]
    assert gen.lr == pytest.approx(best, rel=1e-12)
    torch.testing.assert_close(w.detach(), w0 - best * g, rtol=1e-9, atol=1e-12)
    assert len(rec["losses"]) == len(lr_grid())
    # later probes are ordinary fits
    gen_call(gen, f)
    assert gen.history[1]["mode"] == "fit"


def test_init_search_hits_a_known_optimum_on_the_grid():
    w = torch.tensor([2.0, -1.0], dtype=F64, requires_grad=True)
    f = lambda: 50.0 * (w**2).sum()  # noqa: E731  Hessian 100·I: best lr along -g is exactly 1e-2
    opt = torch.optim.SGD([w], lr=3e-6)
    gen = GeN(opt, probe="same", init_search=True)
    gen_call(gen, f)
    assert gen.lr == pytest.approx(1e-2, rel=1e-12)
    assert f().item() == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("make, echo", [
    (lambda p: torch.optim.SGD(p, lr=1e-5, momentum=0.9), 10.0),
    (lambda p: torch.optim.SGD(p, lr=1e-5, momentum=0.9, nesterov=True), 10.0),
    (lambda p: torch.optim.SGD(p, lr=1e-5, momentum=0.8, dampening=0.5), 2.5),
    (lambda p: torch.optim.RMSprop(p, lr=1e-5, momentum=0.5), 2.0),
    (lambda p: torch.optim.Adam(p, lr=1e-5, betas=(0.9, 0.999)), 1.0),
])
def test_init_search_divides_the_grid_lr_by_the_momentum_echo(make, echo):
    h, c, w = quadratic(seed=5)
    opt = make([w])
    assert momentum_echo(opt.param_groups) == pytest.approx(echo)
    gen = GeN(opt, probe="same", init_search=True, every=1)
    f = loss_of(h, c, w)
    loss = f()
    loss.backward()
    w0 = w.detach().clone()
    opt.step()  # the base step alone, on a copy of the run, gives δ = w0 - w1
    delta = w0 - w.detach()
    with torch.no_grad():
        w.copy_(w0)
    for group in opt.param_groups:
        opt.state[group["params"][0]].clear()
    gen.step(f, loss=loss.detach())
    rec = gen.history[0]
    best = rec["eta_star"]
    assert best == pytest.approx(lr_grid()[min(range(len(rec["losses"])), key=rec["losses"].__getitem__)])
    assert gen.lr == pytest.approx(best / echo, rel=1e-12)
    torch.testing.assert_close(w.detach(), w0 - (best / echo / 1e-5) * delta, rtol=1e-9, atol=1e-12)


def test_momentum_echo_takes_the_largest_group():
    w1, w2 = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([{"params": [w1], "momentum": 0.5}, {"params": [w2], "momentum": 0.0}], lr=0.1)
    assert momentum_echo(opt.param_groups) == pytest.approx(2.0)
    assert momentum_echo(torch.optim.SGD([w1], lr=0.1).param_groups) == 1.0


@pytest.mark.parametrize("momentum,dampening", [(0.9, 0.0), (0.5, 0.3), (0.99, 0.0)])
def test_momentum_fill_is_the_step_length_torch_sgd_reaches_over_its_full_length(momentum, dampening):
    # a persistent gradient (a linear loss): SGD's n-th step over the step it takes once its buffer is full
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, momentum=momentum, dampening=dampening)
    full = 0.1 * (1 - dampening) / (1 - momentum)
    for n in range(1, 800):
        before = w.detach().clone()
        opt.zero_grad()
        w.sum().backward()
        opt.step()
        step = (before - w.detach())[0].item()
        fill = momentum_fill(opt.param_groups, n)
        assert fill == 1.0 if 1 - step / full <= FULL_BUFFER else step / full == pytest.approx(fill, rel=1e-9)
    assert momentum_fill(torch.optim.SGD([w], lr=0.1).param_groups, 1) == 1.0
    assert momentum_fill(torch.optim.Adam([w]).param_groups, 1) == 1.0


def test_a_rise_while_the_buffer_fills_is_scaled_never_turned_into_a_cut():
    assert filled_ratio(2.0, 0.75) == 1.5
    assert filled_ratio(2.0, 0.1) == 1.0      # 0.2 would cut: the lr holds instead
    assert filled_ratio(0.5, 0.1) == 0.5      # cuts are the other rules' business
    assert filled_ratio(2.0, 1.0) == 2.0      # a full buffer (or no momentum) changes nothing


@pytest.mark.parametrize("horizon", ["linear", "cosine"])
def test_horizon_scales_eta_star(horizon):
    import math

    h, c, w = quadratic(seed=6)
    opt = torch.optim.SGD([w], lr=0.01)
    gen = GeN(opt, horizon=horizon, total_steps=8, **exact_gen())
    f = loss_of(h, c, w)
    grads = []
    for t in range(4):
        gen_call(gen, f, before_step=lambda: grads.append(w.grad.clone()))
        gd = grads[-1]
        factor = 1 - t / 8 if horizon == "linear" else (1 + math.cos(math.pi * t / 8)) / 2
        assert gen.history[-1]["horizon"] == pytest.approx(factor)
        assert gen.lr == pytest.approx((gd @ gd / (gd @ h @ gd)).item() * factor, rel=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.9])
def test_algorithm1_is_line_9_unclamped_with_the_three_point_fit(gamma):
    h, c, w = quadratic(seed=7)
    opt = torch.optim.SGD([w], lr=1e-3)  # far below η*: an unclamped jump
    gen = GeN.algorithm1(opt, every=1, smoothing=gamma)
    assert gen.probe == "same" and gen.points == (-1.0, 0.0, 1.0) and not gen.slope
    assert gen.max_change is None and gen.horizon is None
    w0, grads = w.detach().clone(), []
    gen_call(gen, loss_of(h, c, w), before_step=lambda: grads.append(w.grad.detach().clone()))
    (g,) = grads
    eta = (g @ g / (g @ h @ g)).item()
    rec = gen.history[0]
    assert rec["points"] == [-1.0, 0.0, 1.0] and rec["r2"] == pytest.approx(1.0, abs=1e-12)
    assert rec["eta_star"] == pytest.approx(eta, rel=1e-6)
    # the slope is the central difference of the probes, not Σ grad·δ (equal on a quadratic)
    l_m1, _, l_p1 = rec["losses"]
    assert rec["beta_s"] == pytest.approx((l_m1 - l_p1) / 2, rel=1e-12)
    target = gamma * 1e-3 + (1 - gamma) * eta
    assert gen.lr == pytest.approx(target, rel=1e-6) and gen.lr > 2.0 * 1e-3  # past the default clamp ×2
    torch.testing.assert_close(w.detach(), w0 - target * g, rtol=1e-9, atol=1e-12)
