"""`make bench` on the CPU: every row of the table is timed and written (no timings asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

SCHEMES = {"two no-grad forwards (floor)", "gen (probes -1,+1; slope from grad)",
           "gen fast (probe +1; slope from grad)"}


def test_bench_times_every_scheme_at_every_phi_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "genrun.bench", "--device", "cpu", "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
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
