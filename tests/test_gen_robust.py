"""Gates, failures that must not reach the training loop, resume, records, arguments (both estimators)."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from genloop import F64, gen_call, mse
from genrun.gen import GeN


def one_step(gen, f, loss=True):
    """One training call; the latest record (None before the first)."""
    gen_call(gen, f, loss=loss)
    return gen.history[-1] if gen.history else None


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_probe_loss_keeps_lr_and_records_why(bad):
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    gen = GeN(opt, every=1, probe="same")
    calls = []

    def f():
        calls.append(1)
        loss = (w**2).sum()
        return loss * bad if len(calls) == 2 else loss  # the first probe forward is call 2

    rec = one_step(gen, f)
    assert rec["reason"] == "nonfinite" and not rec["accepted"]
    assert gen.lr == 0.1 and rec["lr_after"] == 0.1
    assert torch.equal(w.detach(), torch.tensor([0.8, -1.6], dtype=F64))  # the plain SGD step


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_next_batch_non_finite_probe_cuts_the_step_and_lr_to_a_tenth(bad):
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    gen = GeN(opt, every=1, probe="next")
    w_t = w.detach().clone()
    calls = []

    def f():
        calls.append(1)
        return (w**2).sum() * (bad if len(calls) == 2 else 1.0)  # call 2: the one probe, at w_{t+1}

    assert one_step(gen, f) is None and len(calls) == 2
    assert torch.equal(w.detach(), torch.lerp(w_t, 0.8 * w_t, 0.1)) and gen.lr == pytest.approx(0.01)
    rec = one_step(gen, f)  # its record, one call later: nothing to measure, the cut lr is kept
    assert rec["step"] == 0 and rec["cut"] == 0.1 and rec["reason"] == "nonfinite" and not rec["accepted"]
    assert rec["lr_after"] == pytest.approx(0.01)


def test_r2_gate_rejects_a_quartic_and_accepts_a_quadratic():
    w = torch.full((4,), 3.0, dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.01), every=1, probe="same", guard=False)  # slope=True, min_r2=0.99
    rec = one_step(gen, lambda: (w**4).sum())
    assert rec["reason"] == "r2" and rec["r2"] < 0.99 and gen.lr == 0.01
    # the paper's 3-point fit (slope=False) cannot see it: R² is 1 by construction
    v = torch.full((4,), 3.0, dtype=F64, requires_grad=True)
    gen3 = GeN.algorithm1(torch.optim.SGD([v], lr=0.01), every=1)
    rec3 = one_step(gen3, lambda: (v**4).sum())
    assert rec3["r2"] == pytest.approx(1.0, abs=1e-12) and rec3["accepted"]
    u = torch.full((4,), 3.0, dtype=F64, requires_grad=True)
    genq = GeN(torch.optim.SGD([u], lr=0.01), every=1, probe="same", guard=False)
    recq = one_step(genq, lambda: 5.0 * (u**2).sum())
    assert recq["accepted"] and recq["r2"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("probe,loss_fn,reason", [
    ("same", lambda w: -10.0 * (w**2).sum(), "curvature<=0"),  # concave, β/|a| = 0.5: the guard keeps
    ("same", lambda w: (w**2).sum(), "slope<=0"),       # ascent step (maximize): β < 0
    ("next", lambda w: -(w**2).sum(), "concave"),
    ("next", lambda w: (w**2).sum(), "no_descent"),
])
def test_curvature_and_slope_gates(probe, loss_fn, reason):
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, maximize=reason in ("slope<=0", "no_descent"))
    gen = GeN(opt, every=1, probe=probe)
    for _ in range(3):
        one_step(gen, lambda: loss_fn(w))
    assert len(gen.history) == (2 if probe == "next" else 3)
    assert all(r["reason"] == reason and not r["accepted"] for r in gen.history)
    assert gen.lr == 0.1
    if probe == "next":
        assert all(r["cut"] == 1.0 and r["resolved"] for r in gen.history)


@pytest.mark.parametrize("probe", ["next", "same"])
def test_zero_step_without_scaler_is_not_measured(probe):
    w = torch.tensor([1.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.0), every=1, probe=probe)
    for _ in range(2):
        one_step(gen, lambda: (w**2).sum())
    assert gen.lr == 0.0 and w.item() == 1.0
    if probe == "same":
        assert [r["reason"] for r in gen.history] == ["skipped_step"] * 2
    else:  # δ = 0: nothing held, nothing recorded
        assert gen.history == [] and gen.state_dict()["estimator"]["held"] is None


@pytest.mark.parametrize("probe", ["next", "same"])
def test_closure_error_restores_weights_and_propagates(probe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    x = torch.randn(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = GeN(opt, every=1, model=model, probe=probe)
    loss = model(x).pow(2).mean()
    loss.backward()
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    ref_opt.step()
    buf = [b.clone() for b in model.buffers()]

    def broken():
        model(x)  # moves BatchNorm before failing
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gen.step(broken, loss=loss.detach())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buf))
    assert gen.state_dict()["step"] == 1 and gen.history == [] and gen.lr == 0.1
    if probe == "next":
        assert gen.state_dict()["estimator"]["held"] is None  # a failed probe holds nothing


@pytest.mark.parametrize("where", ["device", "cpu"])
def test_snapshot_moves_only_when_the_point_changes(where):
    """The probe at s = 1 right after the step writes nothing; every other move lands on
    lerp(w_t, w_{t+1}, s) however the parameters got where they were."""
    from genrun.gen.snapshot import StepSnapshot

    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(37))
    w.grad = torch.randn(37)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w_t = w.detach().clone()
    snap = StepSnapshot([w], where)
    opt.step()
    w_next = w.detach().clone()
    snap.after_step()
    version = w._version
    snap.place(1.0)
    assert w._version == version  # no copy queued
    for s in (0.25, 0.25, 0.0, 1.0, 0.7):
        snap.place(s)
        assert torch.equal(w.detach(), torch.lerp(w_t, w_next, s))
    moved = w._version
    snap.place(0.7)
    assert w._version == moved


def _resume_run(split=None, steps=20, probe="next"):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(steps, 16, 5, generator=g), torch.randn(steps, 16, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = GeN(opt, every=3, smoothing=0.5, probe=probe)
    lrs, held = [], None
    for t in range(steps):
        if t == split:
            saved = copy.deepcopy({"m": model.state_dict(), "o": opt.state_dict(), "g": gen.state_dict()})
            held = saved["g"]["estimator"].get("held") is not None
            torch.manual_seed(99)
            model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
            opt = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.01)
            gen = GeN(opt, every=3, smoothing=0.5, probe=probe)
            model.load_state_dict(saved["m"])
            opt.load_state_dict(saved["o"])
            gen.load_state_dict(saved["g"])
        gen_call(gen, mse(model, x[t], y[t]))
        lrs.append(gen.lr)
    return lrs, [p.detach() for p in model.parameters()], gen, held


@pytest.mark.parametrize("probe", ["next", "same"])
@pytest.mark.parametrize("split", [10, 11])  # 10: probe="next" holds the step taken at call 9
def test_state_dict_round_trip_gives_the_same_trajectory(probe, split):
    lrs, params, gen, _ = _resume_run(probe=probe)
    lrs2, params2, gen2, held = _resume_run(split=split, probe=probe)
    if probe == "next":
        assert held is (split == 10)  # the checkpoint carries the held step's δ
    assert lrs == lrs2 and len(set(lrs)) > 3
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert gen.history == gen2.history and gen2.state_dict()["step"] == 20
    assert len(gen.history) == 7  # probes at 0, 3, ..., 18 (probe="next" records 18 at call 19)
    with pytest.raises(KeyError):
        gen2.load_state_dict({"step": 1})


def test_a_state_dict_of_one_estimator_does_not_load_into_the_other():
    w = torch.zeros(1, requires_grad=True)
    state = GeN(torch.optim.SGD([w], lr=0.1), probe="same").state_dict()
    assert set(state) == {"step", "history", "probes", "accepted", "probe", "estimator"} and state["probe"] == "same"
    with pytest.raises(ValueError, match="probe='same'"):
        GeN(torch.optim.SGD([w], lr=0.1), probe="next").load_state_dict(state)


RECORD_KEYS = {
    "next": {"step", "lr_before", "cut", "l0", "l1", "horizon", "lr_after", "ratio", "a_s", "beta_own", "beta_s",
             "eta_star", "eta_own", "eta_avg", "A", "b", "resolved", "accepted", "reason", "delta_norm"},
    "same": {"step", "mode", "lr_before", "lr_after", "ratio", "eta_star", "A", "b", "a_s", "beta_s", "r2",
             "accepted", "reason", "points", "losses", "horizon", "delta_norm"},
}


@pytest.mark.parametrize("probe", ["next", "same"])
def test_will_probe_and_history_records_are_plain_json(probe):
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.1), every=3, probe=probe)
    seen, counts = [], []
    for _ in range(7):
        seen.append(gen.will_probe)
        one_step(gen, lambda: (w**2).sum())
        counts.append(len(gen.history))
    assert seen == [True, False, False, True, False, False, True]
    if probe == "same":  # recorded at the probe step
        assert [r["step"] for r in gen.history] == [0, 3, 6] and counts == [1, 1, 1, 2, 2, 2, 3]
    else:  # recorded at the call after it, which measures it
        assert [r["step"] for r in gen.history] == [0, 3] and counts == [0, 1, 1, 1, 2, 2, 2]
    assert RECORD_KEYS[probe] <= set(gen.history[0])
    assert gen.history[0]["accepted"]
    assert json.loads(json.dumps(gen.history)) == gen.history  # only plain Python values
    assert all(isinstance(v, (int, float, bool, str, list, type(None))) for r in gen.history for v in r.values())


@pytest.mark.parametrize("probe", ["next", "same"])
def test_new_records_returns_those_made_since_a_count(probe):
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.1), every=1, probe=probe, history_size=2)
    seen, logged = [], 0
    for _ in range(6):
        one_step(gen, lambda: (w**2).sum())
        fresh = gen.new_records(logged)
        assert len(fresh) <= 1 and fresh == gen.history[len(gen.history) - len(fresh):]
        seen += [r["step"] for r in fresh]
        logged = gen.probes
    assert seen == (list(range(5)) if probe == "next" else list(range(6)))
    assert gen.new_records(gen.probes) == [] and gen.new_records(0) == gen.history  # all that is kept


@pytest.mark.parametrize("probe", ["next", "same"])
def test_fresh_records_hands_each_record_out_once_and_a_restored_history_not_again(probe):
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)  # w**4: no step lands on the minimum
    gen = GeN(torch.optim.SGD([w], lr=0.1), every=1, probe=probe, history_size=2)
    seen = []
    for _ in range(6):
        one_step(gen, lambda: (w**4).sum())
        seen += [r["step"] for r in gen.fresh_records()]
    assert seen == (list(range(5)) if probe == "next" else list(range(6))) and gen.fresh_records() == []
    state = gen.state_dict()
    restored = GeN(torch.optim.SGD([w], lr=0.1), every=1, probe=probe, history_size=2)
    restored.load_state_dict(state)
    assert restored.fresh_records() == [] and restored.history == gen.history
    for _ in range(3):
        one_step(restored, lambda: (w**4).sum())
    later = [r["step"] for r in restored.fresh_records()]
    assert later and min(later) > seen[-1] and restored.fresh_records() == []


def _opt():
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(every=0), "every must be an integer >= 1, got 0"),
    (dict(every=1.5), "every must be an integer >= 1"),
    (dict(every=True), "every must be an integer >= 1"),
    (dict(smoothing=1.0), r"smoothing must be a number in \[0, 1\)"),
    (dict(smoothing=-0.1), r"smoothing must be a number in \[0, 1\)"),
    (dict(max_change=1.0), "max_change must be None or a number > 1"),
    (dict(min_r2=1.5), "min_r2 must be None or a number <= 1"),
    (dict(horizon="exp"), "horizon must be one of None, 'none', 'linear', 'cosine'"),
    (dict(total_steps=0), "total_steps must be None or an integer >= 1"),
    (dict(snapshot="gpu"), "snapshot must be 'device' or 'cpu'"),
    (dict(mode="newton"), "mode must be 'fit' or 'exact'"),
    (dict(points=()), "points must be a non-empty sequence"),
    (dict(points=(0.0,)), "at least one non-zero multiplier"),
    (dict(points=(1.0, 1.0)), "points must be distinct"),
    (dict(points=(0.0, 1.0), slope=False), "at least two distinct non-zero multipliers"),
    (dict(points=(0.0, math.inf)), "finite"),
    (dict(distributed="yes"), "distributed must be 'auto', True or False"),
    (dict(slope=1), "slope must be True or False"),
    (dict(scaler=object()), "scaler must be None or a GradScaler"),
    (dict(probe="held"), "probe must be 'next' or 'same'"),
    (dict(history_size=0), "history_size must be None or an integer >= 1"),
    (dict(sharded=1), "sharded must be True or False"),
])
@pytest.mark.parametrize("probe", ["next", "same"])
def test_argument_validation(kwargs, message, probe):
    with pytest.raises(ValueError, match=message):
        GeN(_opt(), **{"probe": probe, **kwargs})


@pytest.mark.parametrize("kwargs", [dict(mode="exact"), dict(init_search=True)])
def test_exact_mode_and_init_search_are_options_of_the_same_batch_probes(kwargs):
    with pytest.raises(ValueError, match="mode='exact' and init_search=True are options of probe='same'"):
        GeN(_opt(), probe="next", **kwargs)
    assert GeN(_opt(), probe="same", **kwargs).probe == "same"


@pytest.mark.parametrize("probe", ["next", "same"])
def test_horizon_without_total_steps_is_accepted_and_inert(probe):
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.1), every=1, probe=probe, horizon="linear")
    for _ in range(4):
        one_step(gen, lambda: (w**2).sum())
    assert gen.history and all(r["horizon"] == 1.0 for r in gen.history)
    assert GeN(_opt(), probe=probe).horizon == "cosine"  # the default, inert until total_steps is given


def test_optimizer_type_is_checked():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        GeN([torch.zeros(1)])


@pytest.mark.parametrize("probe", ["next", "same"])
def test_history_size_keeps_the_latest_records_and_counts_all(probe):
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.1), every=1, history_size=3, probe=probe)
    for _ in range(6):
        one_step(gen, lambda: (w**2).sum())
    made = 5 if probe == "next" else 6  # "next": the last probe is still held
    assert [r["step"] for r in gen.history] == list(range(made - 3, made)) and gen.probes == made
    assert gen.accepted == made
    other = GeN(torch.optim.SGD([w], lr=0.1), every=1, history_size=3, probe=probe)
    other.load_state_dict(gen.state_dict())
    assert other.probes == made and other.accepted == made and other.history == gen.history
    legacy = {k: v for k, v in gen.state_dict().items() if k in ("step", "history")}
    other.load_state_dict(legacy)  # a checkpoint from before the counters: they follow the records
    assert other.probes == 3 and other.accepted == 3


@pytest.mark.parametrize("scale,lr_after,grown", [(1.0, 0.14, True), (10.0, 0.1, False)])
def test_guard_grows_on_weak_negative_curvature_and_keeps_the_rate_on_strong(scale, lr_after, grown):
    # L = -scale·‖w‖², SGD lr 0.1: along the step β/|a| = 5/scale; weak curvature (5) grows as a convex
    # fit with s* = 5 would (0.9 + 0.1·5 = 1.4, under the √2 cap), strong (0.5) keeps as Algorithm 1 does
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.1), every=1, guard=True)
    rec = one_step(gen, lambda: -scale * (w**2).sum())
    assert rec["reason"] == "curvature<=0" and rec["concave"] is grown and not rec["grow"]
    assert gen.lr == pytest.approx(lr_after)


@pytest.mark.parametrize("guard", [False, True])
def test_from_a_concave_plateau_the_guard_grows_until_curvature_places_a_minimiser(guard):
    # 1 - tanh(w) from w = -3: concave (a < 0) and nearly flat until w = 0, convex and falling after;
    # Algorithm 1 keeps a rate that crawls along the plateau, the guard grows until the fits turn convex
    w = torch.tensor([-3.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=1.0), every=1, guard=guard)
    for _ in range(30):
        one_step(gen, lambda: 1.0 - torch.tanh(w).sum())
    reasons = [r["reason"] for r in gen.history]
    assert reasons[0] == "curvature<=0"
    if guard:
        assert any(r["grow"] or r["concave"] for r in gen.history) and w.item() > 0.0 and None in reasons
    else:
        assert w.item() < -2.0 and gen.lr == 1.0


@pytest.mark.parametrize("guard", [False, True])
@pytest.mark.parametrize("offset,lr,reason", [(10.0, 1e-6, "curvature<=0"), (100.0, 1e-8, "degenerate")])
def test_from_a_tiny_lr_the_guard_climbs_at_the_clamp_every_probe(guard, offset, lr, reason):
    # float32 least squares (plus a constant: L0 ~ offset) at lr far below η*: (a/2)s² is within
    # the loss's rounding, so a's sign is noise (or, smaller still, every probe rounds to L0 and
    # the fit is degenerate); Algorithm 1 keeps the rate on those probes and climbs only on the rest
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=g), torch.randn(256, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    gen = GeN(torch.optim.SGD(model.parameters(), lr=lr), every=1, guard=guard)
    f = lambda: ((model(x).squeeze(1) - y) ** 2).mean() + offset  # noqa: E731
    for _ in range(12):
        gen_call(gen, f)
    assert any(r["reason"] == reason for r in gen.history)
    if guard:
        assert all(r["accepted"] or r["grow"] for r in gen.history)
        assert gen.lr == pytest.approx(lr * 2**12)
    else:
        assert not any(r["grow"] for r in gen.history) and gen.lr < lr * 2**4



def test_zero_step_without_scaler_is_recorded_as_skipped():
    w = torch.tensor([1.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.0), every=1)
    rec = one_step(gen, lambda: (w**2).sum())
    assert rec["reason"] == "skipped_step" and gen.lr == 0.0



@pytest.mark.parametrize("guard", [False, True])
def test_guard_caps_a_lagging_rate_at_the_fitted_minimiser(guard):
    # L = w²/2, lr 3: η* = 1, s* = 1/3, but smoothing keeps r = 0.9 + 0.1/3 > 2s*
    w = torch.tensor([1.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=3.0), every=1, guard=guard)
    rec = one_step(gen, lambda: 0.5 * (w**2).sum())
    assert rec["accepted"] and rec["cap"] is guard
    if guard:
        assert rec["ratio"] == pytest.approx(1 / 3, rel=1e-12)
        assert w.item() == pytest.approx(0.0, abs=1e-12)  # this step lands on the minimiser
        assert gen.lr == pytest.approx(3.0 / 2)  # the lr moves by the clamp at most: 1/max_change
    else:
        assert rec["ratio"] == pytest.approx(0.9 + 0.1 / 3) and abs(w.item()) > 1.0  # overshot



@pytest.mark.parametrize("guard,max_change", [(False, 2.0), (True, 2.0), (True, None)])
def test_guard_shrinks_to_the_minimiser_when_only_the_r2_gate_rejects(guard, max_change):
    # Σw⁴ from w = 3 at lr 0.05: the step overshoots to -2.4 (still below L0, so no backtrack),
    # the probe behind at s = -1 is ~60x L0: no parabola fits, but the fitted one has s* ≈ 0.12
    w = torch.full((4,), 3.0, dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.05), every=1, guard=guard, max_change=max_change)
    rec = one_step(gen, lambda: (w**4).sum())
    s_star = rec["beta_s"] / rec["a_s"]
    assert rec["reason"] == "r2" and not rec["backtrack"] and 0.1 < s_star < 0.15
    assert rec["shrink"] is guard
    expected = 1.0 if not guard else (0.5 if max_change else s_star)
    assert rec["ratio"] == pytest.approx(expected, rel=1e-12) and gen.lr == pytest.approx(0.05 * expected)
    assert w.detach() == pytest.approx(torch.full((4,), 3.0 - expected * 5.4, dtype=F64))  # this step shrank too



def _gen_with_a_chosen_rate(w: torch.Tensor, lr: float, guard=True) -> GeN:
    """GeN over [w, v] whose first probe accepts a fit that keeps ``lr``: v's quadratic has its
    minimiser exactly at ``lr`` along d (s* = 1, so γ + (1-γ)s* = 1); w has no gradient yet."""
    v = torch.ones(2, dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w, v], lr=lr), every=1, guard=guard)
    before = w.detach().clone()
    rec = one_step(gen, lambda: 0.5 / lr * (v**2).sum())
    assert rec["accepted"] and gen.lr == pytest.approx(lr, rel=1e-9) and torch.equal(w.detach(), before)
    return gen


@pytest.mark.parametrize("eta_star", [0.15, 0.5])
def test_after_a_cut_accepted_fits_restore_the_rate_up_to_the_one_cut(eta_star):
    # A fit chose lr 0.2; then Σw⁴ from w = 3 overshoots (L(1) > L0, R² rejects): the guard
    # backtracks and the lr keeps the cut. Then a quadratic with minimiser η* along d: each accepted
    # fit moves the lr straight to min(η*, 2·lr, 0.2) instead of smoothing it up by 0.9 + 0.1·s*.
    w = torch.full((4,), 3.0, dtype=F64, requires_grad=True)
    gen = _gen_with_a_chosen_rate(w, 0.2)
    top = gen.lr
    cut = one_step(gen, lambda: (w**4).sum())
    assert cut["reason"] == "r2" and cut["backtrack"] and gen.lr < 0.1
    assert gen.state_dict()["estimator"]["ceiling"] == top
    for _ in range(6):
        lr = gen.lr
        rec = one_step(gen, lambda: 0.5 / eta_star * (w**2).sum())
        s_star = rec["eta_star"] / lr
        assert rec["accepted"] and rec["eta_star"] == pytest.approx(eta_star, rel=1e-9)
        smoothed = min(0.9 + 0.1 * s_star, 2.0)
        if lr < min(eta_star, top) * (1 - 1e-9):
            target = min(eta_star, 2 * lr, top)
            assert gen.lr == pytest.approx(target, rel=1e-9)
            assert rec["recover"] is (target > lr * smoothed * (1 + 1e-9))
        else:  # regained: plain smoothing from here on
            assert not rec["recover"] and rec["ratio"] == pytest.approx(smoothed, rel=1e-9)
    recovered = [r["recover"] for r in gen.history[2:]]
    assert recovered.count(True) >= 2 and recovered[-1] is False
    assert (gen.state_dict()["estimator"]["ceiling"] is None) is (eta_star > 0.2)  # cleared once the lr is back at 0.2



def test_a_cut_restores_at_most_a_rate_a_fit_chose():
    # The caller's η0 was never validated: a cut before any accepted fit leaves nothing to restore
    # (restoring a too-high η0 = 10x the default killed one mnist5k network in six, README).
    w = torch.full((4,), 3.0, dtype=F64, requires_grad=True)
    fresh = GeN(torch.optim.SGD([w], lr=0.2), every=1, guard=True)
    cut = one_step(fresh, lambda: (w**4).sum())
    assert cut["backtrack"] and not cut["accepted"] and fresh.state_dict()["estimator"]["ceiling"] is None
    rec = one_step(fresh, lambda: 0.5 / 0.15 * (w**2).sum())
    smoothed = min(0.9 + 0.1 * rec["eta_star"] / rec["lr_before"], 2.0)
    assert rec["accepted"] and not rec["recover"] and rec["ratio"] == pytest.approx(smoothed)
    # a fit chose 0.05, a grow (rule 4) or the caller raised the lr to 0.2 since: restore only to 0.05
    w = torch.full((4,), 3.0, dtype=F64, requires_grad=True)
    gen = _gen_with_a_chosen_rate(w, 0.05)
    gen._scale_lrs(4.0)
    one_step(gen, lambda: (w**4).sum())
    assert gen.lr < 0.05 and gen.state_dict()["estimator"]["ceiling"] == pytest.approx(0.05, rel=1e-9)



def test_a_cap_or_a_shrink_sets_the_ceiling_only_when_the_fit_was_rejected():
    w = torch.tensor([1.0], dtype=F64, requires_grad=True)
    capped = GeN(torch.optim.SGD([w], lr=3.0), every=1, guard=True)
    rec = one_step(capped, lambda: 0.5 * (w**2).sum())
    # rule 5 bounds it
    assert rec["accepted"] and rec["cap"] and capped.state_dict()["estimator"]["ceiling"] is None
    w = torch.full((4,), 3.0, dtype=F64, requires_grad=True)
    shrunk = _gen_with_a_chosen_rate(w, 0.05)
    rec = one_step(shrunk, lambda: (w**4).sum())
    assert rec["shrink"] and shrunk.state_dict()["estimator"]["ceiling"] == pytest.approx(0.05, rel=1e-9)
    restored = GeN(torch.optim.SGD([w], lr=0.025), every=1, guard=True)
    restored.load_state_dict(shrunk.state_dict())
    assert restored.state_dict()["estimator"]["ceiling"] == shrunk.state_dict()["estimator"]["ceiling"]
    assert restored.state_dict()["estimator"]["chosen"] == shrunk.state_dict()["estimator"]["chosen"]


def _cap(guard):  # L = w²/2 from lr 3: the smoothed rate overshoots, s* = 1/3 (rules 2 and 5)
    w = torch.tensor([1.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=3.0), every=1, guard=guard)
    one_step(gen, lambda: 0.5 * (w**2).sum())
    return gen


def _backtrack(guard):  # Σw⁴ from 3 at lr 0.2: the step lands far above L0 and no parabola fits
    w = torch.full((4,), 3.0, dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.2), every=1, guard=guard)
    one_step(gen, lambda: (w**4).sum())
    return gen


def _shrink(guard):  # Σw⁴ from 3 at lr 0.05: only R² rejects, the minimiser lies inside the step
    w = torch.full((4,), 3.0, dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.05), every=1, guard=guard)
    one_step(gen, lambda: (w**4).sum())
    return gen


def _grow(guard):  # float32, L0 ~ 100 at lr 1e-8: every probe rounds to L0
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=g), torch.randn(256, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    gen = GeN(torch.optim.SGD(model.parameters(), lr=1e-8), every=1, guard=guard)
    for _ in range(4):
        gen_call(gen, lambda: ((model(x).squeeze(1) - y) ** 2).mean() + 100.0)
    return gen


def _concave(guard):  # L = -‖w‖², lr 0.1: a well-fitted concave fit with β/|a| = 5
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.1), every=1, guard=guard)
    one_step(gen, lambda: -(w**2).sum())
    return gen


def _recover(guard):  # a fit chose 0.2, a backtrack cut it, then fits with η* = 0.5 bring it back
    w = torch.full((4,), 3.0, dtype=F64, requires_grad=True)
    gen = _gen_with_a_chosen_rate(w, 0.2, guard)
    one_step(gen, lambda: (w**4).sum())
    for _ in range(3):
        one_step(gen, lambda: 0.5 / 0.5 * (w**2).sum())
    return gen


def _fill(guard):  # heavy-ball SGD on 0.05·‖w‖² from lr 0.01: s* = 1000 at a buffer 10 % full (rule 7)
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    gen = GeN(torch.optim.SGD([w], lr=0.01, momentum=0.9), every=1, guard=guard)
    one_step(gen, lambda: 0.05 * (w**2).sum())
    return gen


RULE_CASES = {  # a rule, the run where it acts, and what shows it acted
    "backtrack": (_backtrack, lambda gen: gen.history[0]["backtrack"] and gen.lr < 0.1),
    "cap": (_cap, lambda gen: gen.history[0]["cap"]),
    "shrink": (_shrink, lambda gen: gen.history[0]["shrink"]),
    "grow": (_grow, lambda gen: all(r["grow"] or r["accepted"] for r in gen.history) and gen.lr == 16e-8),
    "concave": (_concave, lambda gen: gen.history[0]["concave"]),
    "keep": (_cap, lambda gen: gen.history[0]["keep"] and gen.lr == pytest.approx(1.5)),  # without it: 3·s* = 1
    "recover": (_recover, lambda gen: any(r["recover"] for r in gen.history)),
    "fill": (_fill, lambda gen: gen.history[0]["fill"] and gen.lr == 0.01),  # without it: doubled
}


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_each_guard_rule_acts_alone_and_can_be_left_out_by_name(rule):
    from genrun.gen.guard import GUARD_RULES

    run, acted = RULE_CASES[rule]
    assert set(RULE_CASES) == set(GUARD_RULES)
    assert acted(run(True)) and acted(run(list(GUARD_RULES)))
    without, plain = run([r for r in GUARD_RULES if r != rule]), run(False)
    assert not acted(without) and not acted(plain)
    # the record's flag for a rule is set only while that rule is in force
    assert any(r[rule] for r in run(True).history)
    assert not any(r[rule] for r in without.history)
    assert not any(r[name] for r in plain.history for name in GUARD_RULES)


def test_guard_given_no_rules_is_algorithm_1s_decisions():
    plain, empty = _shrink(False), _shrink([])
    assert plain.lr == empty.lr and plain.history[0]["ratio"] == empty.history[0]["ratio"]
    with pytest.raises(ValueError, match=r"guard has unknown rules \['bactrack'\]"):
        GeN(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), guard=["bactrack"])
    with pytest.raises(ValueError, match="guard must be True, False or a list of rule names"):
        GeN(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), guard="all")
