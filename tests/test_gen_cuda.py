"""CUDA paths of GeN (skipped without a GPU): syncs, pinned snapshots, bf16, RNG replay.

``python tests/test_gen_cuda.py`` runs these checks without pytest (a bare GPU box) and
then ``--bench`` prints throughput and peak memory of GeN vs its base optimizer.
"""

import copy
import sys
import time
import warnings

import torch
from torch import nn

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
    f = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    for _ in range(steps):
        loss = f()
        loss.backward()
        gen.step(f, loss=loss.detach())
        opt.zero_grad()
    return gen, [p.detach().clone() for p in model.parameters()]


def _final_vs_lerp(snapshot):
    """One probe step; returns (GeN, whether weights == lerp(w_t, w_{t+1}, r) bitwise)."""
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
    gen = GeN(opt, every=1, model=model, snapshot=snapshot)
    gen.step(f)
    r = gen.history[0]["ratio"]
    exact = all(torch.equal(p, torch.lerp(a, b, r)) for p, a, b in zip(model.parameters(), w_t, ref.parameters()))
    return gen, exact


def test_cuda_snapshots_land_exactly_on_lerp_of_the_two_ends():
    gen_d, exact_d = _final_vs_lerp("device")
    gen_c, exact_c = _final_vs_lerp("cpu")
    assert exact_d and exact_c
    assert gen_d.history[0]["accepted"] and gen_d.history[0]["ratio"] != 1.0
    # same probe losses; β is summed in another order on the two paths
    assert gen_c.history[0]["losses"] == gen_d.history[0]["losses"]
    assert abs(gen_c.history[0]["ratio"] / gen_d.history[0]["ratio"] - 1) < 1e-5


def test_cuda_non_probe_steps_never_sync_and_probe_steps_sync_once():
    model = _net()
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = GeN(opt, every=4, model=model)
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
    print("host syncs per gen.step:", syncs)
    assert syncs[1:4] == [0, 0, 0] and syncs[5:8] == [0, 0, 0]
    assert syncs[4] == 1  # the probe step's one .tolist()


def test_cuda_bf16_autocast_dropout_replay_and_rng_stream():
    x, y = _batch()

    def run(use_gen):
        model = _net(dropout=0.3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = GeN(opt, every=1, model=model)

        def f():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return nn.functional.cross_entropy(model(x), y)

        torch.manual_seed(7)
        gen.remember_rng()
        loss = f()
        loss.backward()
        gen.step(f, loss=None) if use_gen else opt.step()
        return loss.float().item(), gen, torch.rand(3, device="cuda"), torch.rand(3)

    l0, gen, cuda_stream, cpu_stream = run(True)
    _, _, cuda_plain, cpu_plain = run(False)
    assert gen.history[0]["losses"][1] == l0
    assert torch.equal(cuda_stream, cuda_plain) and torch.equal(cpu_stream, cpu_plain)


def test_cuda_bf16_parameters_rejected_probe_is_bit_exact():
    model = _net().to(torch.bfloat16)
    x, y = _batch()
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    gen = GeN(opt, every=1, model=model)
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
        gen = GeN(opt, every=1, mode=mode, smoothing=0.5, max_change=None)
        f = lambda: 0.5 * w @ h @ w - c @ w  # noqa: E731
        for _ in range(3):
            loss = f()
            loss.backward()
            gen.step(f, loss=loss.detach())
            opt.zero_grad()
        etas[mode] = [r["eta_star"] for r in gen.history]
    print("eta* fit vs exact:", etas)
    assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(etas["fit"], etas["exact"]))


def bench(name, batch=256, steps=20):
    """Throughput of GeN relative to the base optimizer, and peak memory (fp32/TF32)."""
    import timm

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    model = timm.create_model(name, num_classes=1000).cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    f = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    base_lr = 1e-3 if "vit" in name else 0.05
    rows, base = [], None
    configs = [(None, None), (1, "floor"), (1, "device"), (4, "floor"), (4, "device"), (8, "floor"),
               (8, "device"), (1, "cpu"), (None, None)]
    for every, snapshot in configs:
        opt = (torch.optim.AdamW if "vit" in name else torch.optim.SGD)(model.parameters(), lr=base_lr)
        probing = snapshot in ("device", "cpu")
        gen = GeN(opt, every=every, model=model, snapshot=snapshot, min_r2=None) if probing else None
        for i in range(steps + 8):
            if i == 8:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
            loss = f()
            loss.backward()
            if gen is None:
                opt.step()
                if every is not None and i % every == 0:  # the floor: two plain no-grad forwards
                    with torch.no_grad():
                        f(), f()
            else:
                gen.step(f, loss=loss.detach())
            opt.zero_grad()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        base = dt if base is None else base
        rows.append((every, snapshot, dt, base / dt, torch.cuda.max_memory_allocated() / 2**30))
    print(f"\n{name} batch {batch}, {torch.cuda.get_device_name()}")
    for every, snapshot, dt, rel, mem in rows:
        label = "base" if every is None else (
            f"floor every={every} (+2 fwd)" if snapshot == "floor" else f"GeN every={every} snapshot={snapshot}")
        print(f"  {label:32s} {dt * 1e3:7.1f} ms/step  relative speed {rel:.3f}  peak {mem:.2f} GiB")


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
    if "--bench" in sys.argv:
        for name in ("resnet18", "vit_small_patch16_224"):
            bench(name)
    sys.exit(1 if failed else 0)
