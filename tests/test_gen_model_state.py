"""Probes leave BatchNorm statistics, the RNG stream and GradScaler semantics alone (both estimators)."""

import pytest
import torch
from torch import nn

from genloop import gen_call, gen_train, mse
from genrun.gen import GeN


def data(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, generator=g)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def buffers(model):
    return [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("probe,mode", [("next", "fit"), ("same", "fit"), ("same", "exact")])
def test_batchnorm_statistics_move_only_in_the_training_forward(probe, mode):
    x, y = data()
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = GeN(opt, every=1, model=model, mode=mode, probe=probe)
    f = mse(model, x, y)
    after_forward = []
    for _ in range(3):
        # loss=False: even the s=0 point is a forward
        gen_call(gen, f, loss=False, before_step=lambda: after_forward.append(buffers(model)))
        assert all(torch.equal(a, b) for a, b in zip(buffers(model), after_forward[-1]))
    assert int(model[1].num_batches_tracked) == 3
    assert model.training
    assert len(gen.history) == (2 if probe == "next" else 3)


@pytest.mark.parametrize("probe,forwards", [("next", 1), ("same", 2)])
def test_without_model_the_probes_would_move_batchnorm(probe, forwards):
    x, y = data()
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = GeN(opt, every=1, probe=probe)
    after_forward = []
    gen_call(gen, mse(model, x, y), before_step=lambda: after_forward.extend(buffers(model)))
    # one training forward + the probe forwards: L(1) (next), L(-1) and L(1) (same)
    assert int(model[1].num_batches_tracked) == 1 + forwards
    assert not torch.equal(model[1].running_mean, after_forward[0])


def test_probe_scope_settles_before_the_host_sync():
    """Buffers and RNG are back as soon as the probes are queued, so nothing is left for
    after the decision's host sync (where the device would wait on those copies)."""
    from genrun.gen.probe import ProbeScope, probe_losses

    x, y = data()
    model = bn_model()
    model(x)  # a training forward: running stats and num_batches_tracked (int64) move
    before, rng = buffers(model), torch.get_rng_state()
    f = lambda: ((model(x).squeeze(1) - y) ** 2).mean() + 0 * torch.rand(())  # noqa: E731  draws
    with ProbeScope(model, None) as scope:
        probe_losses(f, lambda s: None, [1.0, -1.0], scope)
        assert all(torch.equal(a, b) for a, b in zip(buffers(model), before))  # both dtypes
        assert torch.equal(torch.get_rng_state(), rng)
        scope.before_call()
        f()  # a closure run outside probe_losses (exact mode's HVP) is settled by the exit
        assert not torch.equal(model[1].running_mean, before[0])
    assert all(torch.equal(a, b) for a, b in zip(buffers(model), before))
    assert torch.equal(torch.get_rng_state(), rng)


def dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1))


def _dropout_step(use_gen, remember, probe="same"):
    x, y = data(1)
    model = dropout_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = GeN(opt, every=1, points=(-1.0, 0.0, 1.0), model=model, probe=probe)
    f = mse(model, x, y)
    torch.manual_seed(123)
    if remember:
        gen.remember_rng()
    loss = f()
    loss.backward()
    if use_gen:
        gen.step(f, loss=None)
    else:
        opt.step()
    return loss.item(), gen, torch.rand(4)


def _s0_loss(gen):
    """The probe loss at s = 0 (w_t) of the first probe step (loss=None: it was a forward)."""
    if gen.probe == "same":
        rec = gen.history[0]
        return rec["losses"][rec["points"].index(0.0)]
    model = gen.model
    gen.zero_grad()  # probe="next" records one call later
    gen_call(gen, lambda: model[-1].weight.square().sum(), loss=False)
    return gen.history[0]["l0"]


@pytest.mark.parametrize("probe", ["next", "same"])
def test_remember_rng_replays_dropout_masks_so_s0_reproduces_l0(probe):
    l0, gen, _ = _dropout_step(use_gen=True, remember=True, probe=probe)
    assert _s0_loss(gen) == l0  # bit-exact: same weights, same masks
    l0_fresh, gen_fresh, _ = _dropout_step(use_gen=True, remember=False, probe=probe)
    assert _s0_loss(gen_fresh) != l0_fresh  # fresh masks: another function


@pytest.mark.parametrize("probe", ["next", "same"])
@pytest.mark.parametrize("remember", [True, False])
def test_probing_does_not_shift_the_training_rng_stream(remember, probe):
    *_, stream_plain = _dropout_step(use_gen=False, remember=remember, probe=probe)
    *_, stream_gen = _dropout_step(use_gen=True, remember=remember, probe=probe)
    assert torch.equal(stream_plain, stream_gen)


def test_remember_rng_is_free_on_non_probe_steps():
    gen = GeN(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), every=2)
    gen.remember_rng()
    assert gen._replay is not None
    gen._step = 1
    gen._replay = None
    gen.remember_rng()
    assert gen._replay is None


def _quadratic(seed=2):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(5, 5, generator=g, dtype=torch.float64)
    h = m @ m.T / 5 + 0.5 * torch.eye(5, dtype=torch.float64)
    w = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    return h, w


@pytest.mark.parametrize("probe", ["next", "same"])
def test_grad_scaler_steps_use_unscaled_gradients(probe):
    h, w = _quadratic()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.SGD([w], lr=0.01)
    gen = GeN(opt, every=1, smoothing=0.0, max_change=None, scaler=scaler, probe=probe)
    grads = []  # unscaled in place by scaler.step
    gen_train(gen, lambda: 0.5 * w @ h @ w, 4, scaler=scaler, after_step=lambda: grads.append(w.grad.clone()))
    assert len(gen.history) == (3 if probe == "next" else 4)
    # β is the unscaled formula (a scaled β would make η* 4096 times too large)
    for rec in gen.history:
        g = grads[rec["step"]]
        beta = rec["beta_own"] if probe == "next" else rec["beta_s"]
        assert rec["accepted"] and beta == pytest.approx((g @ g).item() * rec["lr_before"], rel=1e-9)
        assert rec["eta_star"] == pytest.approx((g @ g / (g @ h @ g)).item(), rel=1e-9)


class FakeScaler:
    """Skips the step when any gradient is non-finite, like GradScaler."""

    def __init__(self):
        self.calls = 0

    def step(self, optimizer):
        self.calls += 1
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if all(torch.isfinite(x).all() for x in grads):
            return optimizer.step()
        return None


def _scaled_call(gen, sc, w, h, f, inf=False):
    loss = 0.5 * w @ h @ w
    (sc.scale(loss) if isinstance(sc, torch.amp.GradScaler) else loss).backward()
    if inf:
        w.grad[0] = float("inf")
    gen.step(f, loss=loss.detach())
    if isinstance(sc, torch.amp.GradScaler):
        sc.update()
    gen.zero_grad()


@pytest.mark.parametrize("scaler,probe", [
    ("torch", "next"), ("fake", "next"), ("torch", "same"), ("fake", "same"),
])
def test_skipped_step_is_not_probed_and_keeps_the_lr(scaler, probe):
    h, w = _quadratic(3)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaler == "torch" else FakeScaler()
    opt = torch.optim.Adam([w], lr=0.01)
    gen = GeN(opt, every=1, scaler=sc, probe=probe)
    calls = []
    f = lambda: calls.append(1) or 0.5 * w @ h @ w  # noqa: E731
    w0 = w.detach().clone()
    _scaled_call(gen, sc, w, h, f, inf=True)
    assert calls == [] and gen.lr == 0.01 and torch.equal(w.detach(), w0)
    assert opt.state[w] == {} or int(opt.state[w]["step"]) == 0
    if probe == "same":
        rec = gen.history[0]
        assert rec["reason"] == "skipped_step" and not rec["accepted"]
        return
    _scaled_call(gen, sc, w, h, f)  # a step taken: probed, held for the next call
    assert gen.history == [] and calls == [1] and int(opt.state[w]["step"]) == 1  # no record of the skipped one
    lr, w1 = gen.lr, w.detach().clone()
    _scaled_call(gen, sc, w, h, f, inf=True)  # the measuring call's step is skipped: no slope, lr kept
    rec = gen.history[0]
    assert rec["step"] == 1 and rec["reason"] == "nonfinite" and not rec["accepted"]
    assert calls == [1] and gen.lr == lr and torch.equal(w.detach(), w1) and int(opt.state[w]["step"]) == 1
