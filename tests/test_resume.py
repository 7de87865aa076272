"""A run killed mid-way and resumed ends with the same weights as one that was never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import torch

from conftest import GENRUN, PATIENCE

ARGS = ["trainer.epochs=8", "trainer.batch_size=32", "trainer.ckpt_every=7", "trainer.progress=off", "seed=5"]


def _weights(run_dir):
    return torch.load(run_dir / "ckpt.pt", weights_only=True)["model"]


def _kill_after_a_checkpoint(run_dir, env, cwd) -> int:
    proc = subprocess.Popen([str(GENRUN), *ARGS, f"hydra.run.dir={run_dir}"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + PATIENCE
        while time.time() < deadline and proc.poll() is None:
            ckpt = run_dir / "ckpt.pt"
            if ckpt.exists():
                step = torch.load(ckpt, weights_only=True)["step"]
                if step >= 30:  # past the first epoch boundary, mid-way through the run
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return step
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
    raise AssertionError("the run ended before it could be killed")


def test_killed_and_resumed_run_matches_an_uninterrupted_one(genrun, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert genrun(*ARGS, f"hydra.run.dir={straight}").returncode == 0

    killed_at = _kill_after_a_checkpoint(stopped, env, tmp_path)
    assert not (stopped / "summary.json").exists()
    total = json.loads((straight / "summary.json").read_text())["total_steps"]
    assert killed_at < total

    # the saved overrides are reused: only the run dir is named
    proc = genrun(f"trainer.resume={stopped}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == total

    a, b = _weights(straight), _weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def records(run_dir, name):
        return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]

    def untimed(rows):  # wall-clock seconds differ between any two runs
        return [{k: v for k, v in row.items() if k not in ("time_s", "eval_s")} for row in rows]

    # the log reads as one run: each step once, lr and GeN probes as in the uninterrupted run
    resumed = records(stopped, "metrics.jsonl")
    assert untimed(records(straight, "metrics.jsonl")) == untimed(resumed)
    assert records(straight, "gen.jsonl") == records(stopped, "gen.jsonl")
    # its clock counts on from the checkpoint: one time axis across the kill
    times = [r["time_s"] for r in resumed]
    assert times == sorted(times) and all(r["eval_s"] >= 0 for r in resumed if r["kind"] == "eval")


def test_ctrl_c_records_an_interrupted_run_that_resume_finishes(genrun, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(GENRUN), *ARGS, "logger=none", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + PATIENCE
        while time.time() < deadline and not (run_dir / "ckpt.pt").exists():
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=PATIENCE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == f"genrun: interrupted; continue with: genrun trainer.resume={run_dir}"
    assert "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] < summary["total_steps"]

    done = genrun(f"trainer.resume={run_dir}")
    assert done.returncode == 0, done.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
