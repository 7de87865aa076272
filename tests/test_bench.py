"""`make bench` on the CPU: every row of the table is timed and written (no timings asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import PATIENCE

SCHEMES = {"two no-grad forwards (floor)", "one no-grad forward (floor of fast)", "one no-grad forward + host sync",
           "gen (probes -1,+1; slope from grad)", "gen fast (probe +1; slope from grad)"}


def test_bench_times_every_scheme_at_every_phi_on_the_cpu(tmp_path):
    out, prof = tmp_path / "bench.json", tmp_path / "prof"
    proc = subprocess.run([sys.executable, "-m", "genrun.bench", "--device", "cpu", "--steps", "1", "--out", str(out),
                           "--profile", str(prof)], capture_output=True, text=True, timeout=PATIENCE)
    assert proc.returncode == 0, proc.stderr
    (setting,) = json.loads(out.read_text())["settings"]  # the CPU has one model: the small CNN
    rows = {(r["scheme"], r["phi"]): r for r in setting["rows"]}
    for phi in (1, 2, 4, 8):
        assert {s for s, p in rows if p == phi} >= SCHEMES
    assert ("gen, snapshot=cpu", 1) in rows
    for row in rows.values():
        assert row["relative_speed"] == setting["base"]["step_s"] / row["step_s"] and row["step_s"] > 0
        assert math.isnan(row["peak_mb"])  # no CUDA: peak memory is not measured, and the table says n/a
    assert "| gen fast (probe +1; slope from grad) | 8 |" in proc.stdout
    # --profile: per model an op table of each scheme and traces of GeN's steps (with its snapshot copies)
    # and of its floor's
    assert [r["scheme"] for r in setting["profile"]] == ["base", "one no-grad forward + host sync, Φ=1",
                                                         "gen fast, Φ=1"]
    assert all(r["step_s"] > 0 and math.isnan(r["busy_s"]) for r in setting["profile"])
    table = (prof / "small_cnn.txt").read_text()
    assert "## base: wall" in table and "## gen fast, Φ=1: wall" in table and "aten::convolution" in table
    names = {e.get("name") for e in json.loads((prof / "small_cnn_gen_fast.json").read_text())["traceEvents"]}
    assert "aten::_foreach_copy_" in names and "Optimizer.step#SGD.step" in names
    floor = {e.get("name") for e in json.loads((prof / "small_cnn_floor.json").read_text())["traceEvents"]}
    assert "aten::_foreach_copy_" not in floor and "aten::item" in floor
    assert "| gen fast, Φ=1 |" in proc.stdout


def test_an_only_that_matches_no_model_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "genrun.bench", "--device", "cpu", "--only", "resnet"],
                          capture_output=True, text=True, timeout=PATIENCE)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "genrun.bench: error: --only 'resnet' matches no model on cpu; there: small CNN, SGD, 8x8, B=64"]


def test_a_failing_profiler_keeps_the_timed_rows(tmp_path, monkeypatch):
    import torch

    from genrun import bench

    def broken(device):
        raise RuntimeError("no profiler here")

    monkeypatch.setattr(bench, "PHIS", (1,))
    monkeypatch.setattr(bench, "_profiler", broken)
    results = bench.run(torch.device("cpu"), steps=1, warmup=1, profile=tmp_path)
    (setting,) = results["settings"]
    assert setting["profile_error"] == "RuntimeError: no profiler here" and "profile" not in setting
    assert len(setting["rows"]) == len(bench.FLOORS) + len(bench.SCHEMES) + 1  # floors, schemes, snapshot=cpu
    assert "Profiling failed: RuntimeError: no profiler here" in bench.markdown(results)


def test_a_floor_row_runs_its_forwards_every_phi_steps():
    import torch
    from torch import nn

    from genrun import bench

    calls = []

    class Counting(nn.Linear):
        def forward(self, x):
            calls.append(torch.is_grad_enabled())
            return super().forward(x)

    setting = bench.Setting("counting", lambda: Counting(4, 3), lambda p: torch.optim.SGD(p, lr=0.1), 2, (4,), 3)
    for phi, forwards, sync in ((1, 2, False), (4, 1, True), (2, 2, True)):
        calls.clear()
        bench.time_steps(setting, torch.device("cpu"), steps=8, warmup=0, floor=(phi, forwards, sync))
        probes = 8 // phi * forwards
        assert calls.count(True) == 8 and calls.count(False) == probes  # training forwards, no-grad floors
