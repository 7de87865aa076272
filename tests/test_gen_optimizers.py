"""GeN around real torch.optim optimizers: one base step per call, groups, untouched params.

What holds for both estimators is parametrized over ``probe``; the exact placement of a probe
step (lerp of its two ends) is tested for each.
"""

import copy

import pytest
import torch

from genloop import gen_call, gen_train, mse
from genrun.gen import GeN

PROBES = pytest.mark.parametrize("probe", ["next", "same"])


def least_squares(seed=0, n=64, d=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + 0.1 * torch.randn(n, generator=g)
    return x, y


@PROBES
def test_base_optimizer_steps_exactly_once_per_call(probe):
    x, y = least_squares()
    w = torch.zeros(8, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    gen = GeN(opt, every=1, smoothing=0.5, probe=probe)
    grads = []
    gen_train(gen, lambda: ((x @ w - y) ** 2).mean(), 12, before_step=lambda: grads.append(w.grad.clone()))
    assert sum(r["accepted"] for r in gen.history) > 0
    # a plain Adam fed the same gradients has the same moments and step count
    v = torch.zeros(8, requires_grad=True)
    ref = torch.optim.Adam([v], lr=0.05)
    for g in grads:
        v.grad = g.clone()
        ref.step()
    s, s_ref = opt.state[w], ref.state[v]
    assert int(s["step"]) == int(s_ref["step"]) == 12
    assert torch.equal(s["exp_avg"], s_ref["exp_avg"])
    assert torch.equal(s["exp_avg_sq"], s_ref["exp_avg_sq"])


@PROBES
def test_group_lr_ratios_survive(probe):
    x, y = least_squares(1)
    a, b = torch.zeros(8, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-3}], momentum=0.5)
    gen = GeN(opt, every=1, probe=probe)
    gen_train(gen, lambda: ((x @ a + b - y) ** 2).mean(), 30)
    assert sum(r["accepted"] for r in gen.history) >= 10
    assert gen.lr != 1e-2
    assert opt.param_groups[0]["lr"] / opt.param_groups[1]["lr"] == pytest.approx(10.0, rel=1e-12)
    assert gen.param_groups is opt.param_groups


@PROBES
def test_frozen_and_gradless_params_are_untouched(probe):
    x, y = least_squares(2)
    w = torch.zeros(8, requires_grad=True)
    frozen = torch.randn(8).requires_grad_(False)
    unused = torch.randn(8, requires_grad=True)
    frozen0, unused0 = frozen.clone(), unused.clone()
    opt = torch.optim.AdamW([w, frozen, unused], lr=0.05, weight_decay=0.1)
    gen = GeN(opt, every=1, probe=probe)
    unused_grads = []
    gen_train(gen, lambda: ((x @ (w + frozen) - y) ** 2).mean(), 5,
              before_step=lambda: unused_grads.append(unused.grad))
    assert unused_grads == [None] * 5
    assert torch.equal(frozen, frozen0) and torch.equal(unused.detach(), unused0.detach())
    assert not torch.equal(w.detach(), torch.zeros(8))
    assert len(gen.history) >= 4 and any(r["lr_after"] != r["lr_before"] for r in gen.history)


OPTIMIZERS = {
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.001, momentum=0.5),
}


@PROBES
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_base_optimizer_reduces_least_squares(name, probe):
    x, y = least_squares(3)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = OPTIMIZERS[name](model.parameters())
    gen = GeN(opt, every=2, probe=probe)
    f = mse(model, x, y)
    first = f().item()
    gen_train(gen, f, 60)
    assert f().item() < 0.25 * first
    assert any(r["accepted"] for r in gen.history)
    steps = [r["step"] for r in gen.history]
    if probe == "same":
        assert steps == list(range(0, 60, 2))  # a record per probe step
    else:  # a record per probe step that moved the weights, made one call later
        assert steps[:10] == list(range(0, 20, 2)) and set(steps) <= set(range(0, 60, 2))


def _one_probe_step(snapshot, closure_factory=None, probe="same", lr=0.05):
    x, y = least_squares(4)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    f = mse(model, x, y)
    for _ in range(2):  # give momentum some state
        f().backward()
        opt.step()
        opt.zero_grad()
    plain_model, plain_opt = copy.deepcopy(model), None
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=lr, momentum=0.9)
    plain_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # else buffers are shared
    w_t = [p.detach().clone() for p in model.parameters()]
    loss = f()
    loss.backward()
    ((plain_model(x).squeeze(1) - y) ** 2).mean().backward()
    plain_opt.step()
    gen = GeN(opt, every=1, snapshot=snapshot, probe=probe, **({"guard": False} if probe == "same" else {}))
    gen.step(closure_factory(f) if closure_factory else f, loss=loss.detach())
    w_next = [p.detach().clone() for p in plain_model.parameters()]
    return gen, w_t, w_next, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("snapshot", ["device", "cpu"])
def test_final_weights_are_exactly_lerp_of_the_two_ends(snapshot):
    gen, w_t, w_next, w = _one_probe_step(snapshot)
    rec = gen.history[0]
    assert rec["accepted"] and rec["ratio"] != 1.0
    for a, b, p in zip(w_t, w_next, w):
        assert torch.equal(p, torch.lerp(a, b, rec["ratio"]))  # w_t - r·δ, one rounding


@pytest.mark.parametrize("snapshot", ["device", "cpu"])
def test_rejected_probe_leaves_the_base_step_bit_exactly(snapshot):
    def nan_probes(f):
        return lambda: f() * float("nan")

    gen, _, w_next, w = _one_probe_step(snapshot, nan_probes)
    assert gen.history[0]["reason"] == "nonfinite" and gen.history[0]["ratio"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(w, w_next))


def _held_record(gen):
    """The record of the probe step just taken: probe="next" makes it at the next call."""
    params = [p for group in gen.param_groups for p in group["params"]]
    gen.zero_grad()  # the probe step's own gradients are still there
    gen_call(gen, lambda: sum((p**2).sum() for p in params), loss=False)  # any batch will do
    return gen.history[0]


@pytest.mark.parametrize("snapshot", ["device", "cpu"])
def test_next_batch_probe_step_is_the_base_step_bit_exactly_unless_cut(snapshot):
    gen, w_t, w_next, w = _one_probe_step(snapshot, probe="next")
    assert gen.history == [] and gen.lr == 0.05  # measured at the next call
    assert all(torch.equal(a, b) for a, b in zip(w, w_next))
    assert _held_record(gen)["cut"] == 1.0


@pytest.mark.parametrize("snapshot", ["device", "cpu"])
def test_next_batch_cut_lands_exactly_on_lerp_of_the_two_ends(snapshot):
    gen, w_t, w_next, w = _one_probe_step(snapshot, probe="next", lr=2.0)  # raises its batch's loss
    lr_cut = gen.lr
    cut = _held_record(gen)["cut"]
    assert 0.0 < cut < 0.5 and gen.history[0]["lr_before"] == 2.0
    assert lr_cut == 2.0 * cut  # the lr is cut with the step, at once
    for a, b, p in zip(w_t, w_next, w):
        assert torch.equal(p, torch.lerp(a, b, cut))  # w_t - r·δ, one rounding


@pytest.mark.parametrize("probe,lr", [("same", 0.05), ("next", 2.0)])
def test_cpu_and_device_snapshots_agree_bitwise(probe, lr):
    _, _, _, w_dev = _one_probe_step("device", probe=probe, lr=lr)
    _, _, w_next, w_cpu = _one_probe_step("cpu", probe=probe, lr=lr)
    assert not all(torch.equal(a, b) for a, b in zip(w_dev, w_next))  # the step was rescaled or cut
    assert all(torch.equal(a, b) for a, b in zip(w_dev, w_cpu))


@PROBES
def test_tensor_learning_rate_is_scaled_in_place(probe):
    x, y = least_squares(5)
    w = torch.zeros(8, requires_grad=True)
    lr = torch.tensor(0.01)
    opt = torch.optim.Adam([w], lr=lr)
    gen = GeN(opt, every=1, smoothing=0.0, probe=probe)
    gen_train(gen, lambda: ((x @ w - y) ** 2).mean(), 2)
    assert opt.param_groups[0]["lr"] is lr  # the caller's tensor, moved in place
    rec = gen.history[0]
    assert rec["lr_after"] != rec["lr_before"] == pytest.approx(0.01)
    if probe == "next":
        assert gen.lr == pytest.approx(rec["lr_after"]) and float(lr) == gen.lr
