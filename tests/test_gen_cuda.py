"""CUDA paths of GeN (skipped without a GPU): syncs, pinned snapshots, bf16, RNG replay (both estimators).

``python tests/test_gen_cuda.py`` runs these checks without pytest (a bare GPU box); speed and
memory are ``python -m genrun.bench --device cuda``'s.
"""

import copy
import sys
import warnings

import torch
from torch import nn

from genloop import gen_train, loss_of
from genrun.gen import GeN

try:
    import pytest

    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
except ImportError:  # the GPU machine may have no pytest; see __main__
    pytest = None


def _net(dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(dropout),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    ).cuda()


def _batch():
    g = torch.Generator(device="cuda").manual_seed(0)
    return torch.randn(64, 3, 8, 8, device="cuda", generator=g), torch.randint(0, 10, (64,), device="cuda", generator=g)


def _step(model, snapshot, every=1, steps=3):
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = GeN(opt, every=every, model=model, snapshot=snapshot)
    gen_train(gen, lambda: nn.functional.cross_entropy(model(x), y), steps)
    return gen, [p.detach().clone() for p in model.parameters()]


def _final_vs_lerp(snapshot):
    """One probe step; returns (GeN, largest |weights - lerp(w_t, w_{t+1}, r)|, 0 when bit-exact)."""
    model = _net()
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    f = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    f().backward()
    opt.step()
    opt.zero_grad()
    w_t = [p.detach().clone() for p in model.parameters()]
    f().backward()
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    ref_opt.step()
    gen = GeN(opt, every=1, model=model, snapshot=snapshot, probe="same")
    gen.step(f)
    r = gen.history[0]["ratio"]
    ends = zip(model.parameters(), w_t, ref.parameters())
    worst = max((p - torch.lerp(a, b, r)).abs().max().item() for p, a, b in ends)
    return gen, worst


def test_cuda_snapshots_land_exactly_on_lerp_of_the_two_ends():
    gen_d, off_d = _final_vs_lerp("device")
    gen_c, off_c = _final_vs_lerp("cpu")
    assert off_d == 0.0 and off_c == 0.0, (off_d, off_c)
    rec = gen_d.history[0]
    assert rec["accepted"] and rec["ratio"] != 1.0, {k: rec[k] for k in ("reason", "ratio", "r2", "losses")}
    # the same probe points: equal losses up to the two runs' own rounding (cuDNN's weight gradients are not
    # bit-reproducible from run to run, so w_t differs in the last bits; a misplaced point moves the loss by ~0.1)
    losses_c, losses_d = gen_c.history[0]["losses"], gen_d.history[0]["losses"]
    assert len(losses_c) == 3 and all(abs(c / d - 1) < 1e-6 for c, d in zip(losses_c, losses_d)), (losses_c, losses_d)
    # β is summed in another order on the two paths
    assert abs(gen_c.history[0]["ratio"] / gen_d.history[0]["ratio"] - 1) < 1e-5


def test_cuda_non_probe_steps_never_sync_and_probe_steps_sync_once():
    # probe="same": the probe step's one .tolist(); probe="next": that of the probe step and that of
    # the call after it, which measures the held step's slope
    expected = {"same": [0, 0, 0, 1, 0, 0, 0], "next": [1, 0, 0, 1, 1, 0, 0]}
    for probe, sync_pattern in expected.items():
        syncs = _syncs_per_call(probe)
        assert syncs[1:8] == sync_pattern, (probe, syncs)


def _syncs_per_call(probe):
    model = _net()
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = GeN(opt, every=4, model=model, probe=probe)
    f = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    syncs = []
    for t in range(8):
        gen.remember_rng()
        loss = f()
        loss.backward()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                gen.step(f, loss=loss.detach())
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found = [w for w in caught if "synchroniz" in str(w.message)]
        syncs.append(len(found))
        if t == 0:
            print("first probe step syncs at:", [f"{w.filename}:{w.lineno}" for w in found])
        opt.zero_grad()
    print(f"host syncs per gen.step (probe={probe!r}):", syncs)
    assert len(gen.history) == 2
    return syncs


def test_cuda_bf16_autocast_dropout_replay_and_rng_stream():
    x, y = _batch()

    def run(use_gen, probe):
        model = _net(dropout=0.3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = GeN(opt, every=1, model=model, probe=probe)

        def f():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return nn.functional.cross_entropy(model(x), y)

        torch.manual_seed(7)
        gen.remember_rng()
        loss = f()
        loss.backward()
        gen.step(f, loss=None) if use_gen else opt.step()
        streams = torch.rand(3, device="cuda"), torch.rand(3)
        if use_gen and probe == "next":  # its record is made at the next call
            opt.zero_grad()
            f().backward()
            gen.step(f)
        return loss.float().item(), gen, *streams

    for probe in ("next", "same"):
        l0, gen, cuda_stream, cpu_stream = run(True, probe)
        _, _, cuda_plain, cpu_plain = run(False, probe)
        s0 = gen.history[0]["l0"] if probe == "next" else gen.history[0]["losses"][1]
        assert s0 == l0, (probe, s0, l0)  # loss=None: the probe at s = 0 replays the training forward's masks
        assert torch.equal(cuda_stream, cuda_plain) and torch.equal(cpu_stream, cpu_plain), probe


def test_cuda_bf16_parameters_rejected_probe_is_bit_exact():
    model = _net().to(torch.bfloat16)
    x, y = _batch()
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    gen = GeN(opt, every=1, model=model, probe="same")  # probe="next" cuts a non-finite probe's step
    nn.functional.cross_entropy(ref(x.bfloat16()), y).backward()
    ref_opt.step()
    loss = nn.functional.cross_entropy(model(x.bfloat16()), y)
    loss.backward()
    gen.step(lambda: torch.tensor(float("nan"), device="cuda"), loss=loss.detach())
    assert gen.history[0]["reason"] == "nonfinite"
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_cuda_exact_mode_runs_and_agrees_with_fit_on_a_quadratic():
    g = torch.Generator(device="cuda").manual_seed(0)
    m = torch.randn(16, 16, device="cuda", dtype=torch.float64, generator=g)
    h = m @ m.T / 16 + torch.eye(16, device="cuda", dtype=torch.float64)
    c = torch.randn(16, device="cuda", dtype=torch.float64, generator=g)
    w0 = torch.randn(16, device="cuda", dtype=torch.float64, generator=g)
    etas = {}
    for mode in ("fit", "exact"):
        w = w0.clone().requires_grad_()
        opt = torch.optim.Adam([w], lr=0.05)
        gen = GeN(opt, every=1, probe="same", mode=mode, smoothing=0.5, max_change=None)
        gen_train(gen, loss_of(h, c, w), 3)
        etas[mode] = [r["eta_star"] for r in gen.history]
    print("eta* fit vs exact:", etas)
    assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(etas["fit"], etas["exact"]))


if __name__ == "__main__":
    failed = 0
    for key, fn in sorted(globals().items()):
        if key.startswith("test_cuda") and callable(fn):
            try:
                fn()
                print("PASS", key)
            except Exception as e:  # noqa: BLE001
                failed += 1
                print("FAIL", key, type(e).__name__, e)
    sys.exit(1 if failed else 0)
