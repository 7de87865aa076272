"""Processes: `trainer.devices=N` data-parallel processes (gloo on this CPU) train like one process;
DataLoader workers change nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import GENRUN, PATIENCE, scored_in_shares
from genrun.checkpoint import rng_of
from genrun.errors import UserError
from genrun.runtime import EpochBatches

QUIET = ["trainer.progress=off", "logger=none"]


def _train_records(run_dir: Path) -> list[dict]:
    """Train records without `time_s`: wall-clock seconds differ between any two runs."""
    return [{k: v for k, v in r.items() if k != "time_s"}
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.parametrize("size,batch,world", [(10, 4, 2), (9, 4, 2), (9, 4, 3), (7, 6, 4), (5, 4, 4)])
def test_the_processes_shards_make_up_each_batch(size, batch, world):
    whole = list(EpochBatches(size, batch, seed=3, epoch=1))
    shards = [list(EpochBatches(size, batch, seed=3, epoch=1, rank=r, world=world)) for r in range(world)]
    assert all(len(s) == len(whole) for s in shards)  # every process takes every step
    for step, full in enumerate(whole):
        parts = [s[step] for s in shards]
        assert all(parts)  # no process is left without an example
        seen = [i for part in parts for i in part]
        assert set(seen) == set(full)
        if len(full) >= world:  # a full batch: disjoint shards, sizes within one
            assert sorted(seen) == sorted(full) and max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_train_as_one_does(genrun, tmp_path, accum):
    # no BatchNorm or dropout in the small CNN: the mean of the two shards' gradients is the
    # batch gradient, so only float rounding separates the runs (it grows over many steps)
    # each process evaluates half of the test split (eval_every=3: at steps 3, 6, 9, 12)
    # (sched=cosine only draws GeN's warning, which process 0 alone logs, to the console and genrun.log)
    args = [*QUIET, "trainer.max_steps=12", "trainer.batch_size=32", f"trainer.grad_accum={accum}",
            "trainer.eval_every=3", "sched=cosine"]
    for devices in (1, 2):
        proc = genrun(*args, f"trainer.devices={devices}", f"hydra.run.dir={tmp_path / str(devices)}")
        assert proc.returncode == 0, proc.stderr
        log = (tmp_path / str(devices) / "genrun.log").read_text()
        assert (proc.stdout + proc.stderr).count("sched=cosine is ignored") == log.count("sched=cosine is ignored") == 1
    one, two = _train_records(tmp_path / "1"), _train_records(tmp_path / "2")
    evals = [[r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "eval"] for d in "12"]
    assert [r["step"] for r in evals[1]] == [r["step"] for r in evals[0]] == [3, 6, 9, 12]
    for a, b in zip(*evals):  # 360 test images: one flipped prediction moves acc by 0.0028
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3) and b["acc"] == pytest.approx(a["acc"], abs=0.003)
    assert [r["step"] for r in two] == list(range(1, 13))  # one process writes; each step once
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert [lr for r in two for lr in r["lr"]] == pytest.approx([lr for r in one for lr in r["lr"]], rel=1e-4)
    gen_one, gen_two = ((tmp_path / d / "gen.jsonl").read_text().splitlines() for d in "12")
    assert len(gen_two) == len(gen_one) == 3
    summary = json.loads((tmp_path / "2" / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["status"] == "finished" and summary["step"] == 12
    assert "MB (cpu) in process 0 of 2" in proc.stdout


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    torchrun = GENRUN.with_name("torchrun")
    return subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "genrun.cli", *args], cwd=cwd,
                          env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=PATIENCE)


def test_torchrun_processes_share_one_run_dir_and_train_as_one_does(genrun, tmp_path):
    args = [*QUIET, "trainer.max_steps=12", "trainer.batch_size=32"]
    assert genrun(*args, f"hydra.run.dir={tmp_path / 'one'}").returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    proc = _torchrun(*args, cwd=work)
    assert proc.returncode == 0, proc.stderr
    runs = list(work.glob("outputs/*/*"))  # Hydra's default outputs/<date>/<time>, made by rank 0 only
    assert len(runs) == 1 and sorted(p.name for p in work.iterdir()) == ["outputs"]
    run = runs[0]
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert proc.stdout.count("genrun: finished after 12 steps") == 1  # rank 0 reports
    one, two = _train_records(tmp_path / "one"), _train_records(run)
    assert [r["step"] for r in two] == list(range(1, 13))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert json.loads((run / "summary.json").read_text())["devices"] == 2


@pytest.mark.parametrize("args,message", [
    (["-m", "seed=1,2"], "genrun: error: -m under torchrun: start one torchrun per job"),
    (["trainer.devices=2"], "genrun: error: trainer.devices=2 under torchrun: torchrun starts the processes"),
])
def test_what_torchrun_cannot_do_is_a_one_line_error(tmp_path, args, message):
    proc = _torchrun(*QUIET, *args, cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("summary.json"))


@pytest.mark.parametrize("task", [
    ["task=digits"],
    ["task=synthetic_seqrec", "task.users=60", "model=bert4rec", "model.hidden=16", "model.layers=1"],
])
def test_loader_workers_do_not_change_the_run(genrun, tmp_path, task):
    # batches are a function of (seed, epoch, index); Cloze masks of (seed, epoch, user)
    for workers in (0, 2):
        proc = genrun(*task, *QUIET, "trainer.max_steps=8", "trainer.batch_size=16",
                      f"trainer.num_workers={workers}", f"hydra.run.dir={tmp_path / str(workers)}")
        assert proc.returncode == 0, proc.stderr
    assert _train_records(tmp_path / "0") == _train_records(tmp_path / "2")


def test_evaluation_shares_make_up_the_split(monkeypatch):
    from genrun import parallel

    data = list(range(7))
    monkeypatch.setattr(parallel, "world", lambda: 3)
    shares = []
    for r in range(3):
        monkeypatch.setattr(parallel, "rank", lambda r=r: r)
        shares.append(list(parallel.shard(data)))
    assert sorted(i for s in shares for i in s) == data and [len(s) for s in shares] == [3, 2, 2]
    assert parallel.shard([1, 2]) == [1, 2]  # fewer examples than processes: all of it
    assert parallel.parts("mine", [1, 2]) == ["mine"]  # ... and its own prediction is the split's


def test_shares_of_a_split_score_as_the_whole_split_does():
    from genrun.models import BERT4Rec, SmallCNN
    from genrun.tasks.recsys import SyntheticSequences
    from genrun.tasks.synthetic import Beale, Point
    from genrun.tasks.vision import Digits

    torch.manual_seed(0)  # rel=1e-6: each batch's float32 sum depends on which examples share it
    task = Digits()
    shared, whole = scored_in_shares(task, SmallCNN(num_classes=10, in_channels=1).eval(),
                                     task.datasets()[1]["test"], batch_size=64)
    assert shared == pytest.approx(whole, rel=1e-6) and 0.0 < whole["acc"] < 1.0
    task = SyntheticSequences(num_items=40, users=30, max_len=12, negatives=20)
    model = BERT4Rec(num_items=40, max_len=12, hidden=16, layers=1, heads=2, dropout=0.0).eval()
    shared, whole = scored_in_shares(task, model, task.datasets()[1]["test"], batch_size=8)
    assert shared == pytest.approx(whole, rel=1e-6) and 0.0 < whole["recall@10"] < 1.0
    task = Beale(start=[0.5, -1.0], iterations=3)
    assert scored_in_shares(task, Point(task.start), task.datasets()[1]["test"], count=1)[0]["objective"] > 0


def test_auto_workers_feed_gpus_and_leave_the_cpu_to_compute(monkeypatch):
    from genrun.parallel import cpu_threads
    from genrun.runtime import loader_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr("genrun.parallel.world", lambda: 8)
    gpu = torch.device("cuda", 0)
    assert cpu_threads() == 4  # 32 cores over this machine's 8 processes
    assert loader_workers("auto", torch.device("cpu"), 32, heavy_items=True) == 0
    assert loader_workers("auto", gpu, 32, heavy_items=True) == 8
    assert loader_workers("auto", gpu, cpu_threads(), heavy_items=True) == 4
    assert loader_workers("auto", gpu, 32, heavy_items=False) == 0  # in-memory items: no workers to start
    assert loader_workers(3, torch.device("cpu"), 32, heavy_items=False) == 3


def test_a_checkpoint_holds_the_state_of_as_many_processes_as_resume_it():
    one = {"rng": "r0", "rng_ranks": None}
    two = {"rng": "r0", "rng_ranks": ["r0", "r1"]}
    assert rng_of(one, 0, 1) == "r0" and rng_of(two, 1, 2) == "r1"
    with pytest.raises(UserError, match="trainer.devices=2 but the checkpoint was written by 1"):
        rng_of(one, 0, 2)


def test_bad_input_met_inside_the_processes_is_one_line_and_leaves_no_run(genrun, tmp_path):
    proc = genrun("task=cifar10", f"task.data_dir={tmp_path / 'nowhere'}", "trainer.devices=2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"genrun: error: task.data_dir: no CIFAR-10 at {tmp_path / 'nowhere' / 'cifar-10-batches-py'}; run with "
        f"task.download=true (needs internet) or extract cifar-10-python.tar.gz into {tmp_path / 'nowhere'}"]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_batch_size_must_split_over_the_processes(genrun):
    proc = genrun("trainer.devices=2", "trainer.batch_size=63")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("genrun: error: trainer.batch_size=63 does not split over 2 processes "
                                   "(trainer.devices or torchrun's): make it a multiple of 2")


def test_second_derivative_optimizers_refuse_several_processes(genrun):
    proc = genrun("optim=adahessian", "trainer.devices=2", *QUIET)
    assert proc.returncode == 2
    assert "trainer.devices=2: optim=adahessian needs second derivatives" in proc.stderr
    assert "Traceback" not in proc.stderr


def _stat(pid: int | str) -> list[str] | None:
    """(state, parent pid, ...) of a Linux process; None once it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and (_stat(p.name) or [0, 0])[1] == str(pid)]


def test_killing_the_launcher_ends_its_processes(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(GENRUN), *QUIET, "trainer.devices=2", "trainer.epochs=50", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + PATIENCE
        while time.time() < deadline and not (run_dir / "ckpt.pt").exists():  # the processes are training
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + PATIENCE
        while time.time() < deadline and any(map(_stat, workers)):
            time.sleep(0.05)
        assert not any(map(_stat, workers))
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_to_the_launcher_stops_its_processes_and_records_the_run_as_interrupted(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(GENRUN), *QUIET, "trainer.devices=2", "trainer.epochs=50", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + PATIENCE
        while time.time() < deadline and not (run_dir / "ckpt.pt").exists():
            time.sleep(0.05)
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)  # `timeout` and some schedulers signal only the process they started
        _, err = proc.communicate(timeout=PATIENCE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == f"genrun: stopped by SIGTERM; continue with: genrun trainer.resume={run_dir}"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    deadline = time.time() + PATIENCE
    while time.time() < deadline and any(map(_stat, workers)):  # multiprocessing's resource tracker, too
        time.sleep(0.05)
    assert not any(map(_stat, workers))


def test_ddps_unused_parameter_error_names_the_key(tmp_path):
    from genrun.launch import explain

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 1), "unused": torch.nn.Linear(2, 1)})
        net.forward = lambda x: net["used"](x)
        for find_unused in (False, True):  # DDP's own error, then what the key turns on
            model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=find_unused)
            try:
                for _ in range(2):
                    model(torch.ones(3, 2)).sum().backward()
            except RuntimeError as err:
                assert not find_unused
                assert "set trainer.ddp_find_unused=true" in str(explain(err))
            else:
                assert find_unused
    finally:
        torch.distributed.destroy_process_group()


def test_a_diverging_two_process_run_stops_in_every_process(genrun, tmp_path):
    # the loss every process checks is the mean over processes: all stop at the same step
    run_dir = tmp_path / "run"
    proc = genrun("optim=sgd", "optim.lr=3.0", "optim.momentum=0.99", "trainer.ckpt_every=1", "trainer.devices=2",
                  *QUIET, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["devices"] == 2
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert 0 < ckpt["step"] <= summary["step"] and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_a_parallel_sweep_of_two_process_jobs(genrun, tmp_path):
    # joblib's loky workers default to a start method their spawned children cannot resolve
    sweep = tmp_path / "sweep"
    proc = genrun("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "trainer.devices=2", "seed=0,1",
                  "trainer.max_steps=4", *QUIET, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    summaries = [json.loads((sweep / str(job) / "summary.json").read_text()) for job in (0, 1)]
    assert all(s["status"] == "finished" and s["devices"] == 2 and s["step"] == 4 for s in summaries)
