"""Run-dir claims, atomic files and stop signals, in-process: what `test_safety.py` relies on, case by case."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch

from conftest import tree
from genrun import atomic, checkpoint, rundir, stop
from genrun.errors import UserError


def hydra_writes(run) -> None:
    """What Hydra writes into a run dir before the run starts."""
    (run / ".hydra").mkdir(exist_ok=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text(f"new {name}\n")
    with open(run / "genrun.log", "a") as f:
        f.write("[INFO] a line of the failed start\n")


def test_a_failed_start_in_an_existing_dir_undoes_exactly_what_it_did(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    (run / "genrun.log").write_text("the first run's log\n")
    (run / "notes").write_text("mine")
    before = tree(tmp_path)
    taken = rundir.claim(run, key="hydra.run.dir")
    hydra_writes(run)
    assert not taken.used()  # no record, no checkpoint: a failed start
    taken.discard_unless_used()
    taken.release()
    assert tree(tmp_path) == before


def test_a_failed_start_removes_the_dirs_it_made_and_only_while_empty(tmp_path):
    (tmp_path / "a").mkdir()
    taken = rundir.claim(tmp_path / "a" / "b" / "c" / "run", key="hydra.run.dir")
    assert taken.new and taken.made == [tmp_path / "a" / "b", tmp_path / "a" / "b" / "c", taken.path]
    hydra_writes(taken.path)
    (tmp_path / "a" / "b" / "other-run").mkdir()  # another run started beside it meanwhile
    taken.discard()
    taken.release()
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["other-run"]


def test_a_run_that_wrote_records_is_kept(tmp_path):
    taken = rundir.claim(tmp_path / "run", key="hydra.run.dir")
    hydra_writes(taken.path)
    (taken.path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    assert taken.used()
    rundir.close_all(failed=True)
    assert (taken.path / "metrics.jsonl").is_file() and taken not in rundir._claims


def test_automatic_names_never_collide_and_a_dir_in_use_is_refused(tmp_path):
    first = rundir.claim(tmp_path / "12-00-00", key="hydra.run.dir", fresh=True)
    second = rundir.claim(tmp_path / "12-00-00", key="hydra.run.dir", fresh=True)
    assert (first.path.name, second.path.name) == ("12-00-00", "12-00-00-1") and second.new
    assert rundir.in_use(first.path)
    with pytest.raises(UserError, match=r"hydra.run.dir=.*12-00-00 is in use by another running genrun"):
        rundir.claim(first.path, key="hydra.run.dir")
    first.release()
    second.release()
    assert not rundir.in_use(first.path)
    rundir.claim(first.path, key="hydra.run.dir").release()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-555 dir")
def test_a_dir_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(UserError, match=r"cannot make or write this dir \(Permission denied\)"):
        rundir.claim(locked / "run", key="hydra.run.dir")


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_write_that_fails_keeps_the_previous_file_and_leaves_no_temporary_one(tmp_path, monkeypatch):
    summary = tmp_path / "summary.json"
    atomic.write_text(summary, '{"status": "interrupted"}\n')
    checkpoint.save(tmp_path / "ckpt.pt", {"step": 2})
    monkeypatch.setattr(os, "fsync", no_space)  # a full disk often says so only when flushed
    with pytest.raises(OSError, match="No space left"):
        atomic.write_text(summary, '{"status": "finished"}\n')

    def half_then_full(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        no_space()

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tmp_path / "ckpt.pt", {"step": 4})
    assert json.loads(summary.read_text()) == {"status": "interrupted"}
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "summary.json"]


def test_a_csv_whose_header_grows_on_a_full_disk_keeps_its_rows(tmp_path, monkeypatch):
    from genrun.sinks import CsvSink

    sink = CsvSink(tmp_path)
    sink.log({"kind": "train", "step": 1, "loss": 0.5, "lr": [0.1]})
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        sink.log({"kind": "eval", "step": 1, "split": "test", "acc": 0.9, "lr": [0.1]})  # a new column: rewrite
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["kind,step,loss,lr_group0", "train,1,0.5,0.1"]
    assert not list(tmp_path.glob("*.tmp"))
    sink.close()


def test_a_full_disk_is_worded_with_its_mount_point_and_a_denied_write_with_its_file(tmp_path):
    full = rundir.storage_problem(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert full.startswith("the disk at /") and f"No space left on device writing into {tmp_path}, " in full
    denied = rundir.storage_problem(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x")), tmp_path)
    assert denied.startswith(f"Permission denied writing {tmp_path / 'x'}: make it writable")
    assert rundir.storage_problem(ValueError("not a write"), tmp_path) is None


# -- the engine: stop signals and what a stopped run says about its checkpoint --------------------------

@pytest.fixture
def signals():
    """genrun's handlers for SIGTERM and SIGUSR1 in this process, the previous ones back afterwards."""
    previous = {sig: signal.getsignal(sig) for sig in stop.SIGNALS}
    stop.install()
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _signal_at(monkeypatch, step: int, signum: int) -> None:
    from genrun import sinks

    log = sinks.JsonlSink.log

    def log_then_signal(self, record):
        log(self, record)
        if record["kind"] == "train" and record["step"] == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(sinks.JsonlSink, "log", log_then_signal)


def test_sigusr1_ends_the_step_checkpoints_it_and_stops(compose_cfg, tmp_path, monkeypatch, signals):
    from genrun.engine import train

    _signal_at(monkeypatch, 3, signal.SIGUSR1)
    with pytest.raises(stop.Stopped) as err:
        train(compose_cfg(["logger=none", "trainer.max_steps=8", "trainer.progress=off"]), tmp_path)
    assert stop.exit_code(err.value) == 128 + signal.SIGUSR1 and not stop.pending()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("interrupted", 3)
    assert summary["message"] == "stopped by SIGUSR1 after 3 steps; the last good checkpoint (step 3) is kept"
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3


def test_a_run_stopped_or_diverged_before_its_first_checkpoint_says_there_is_none(compose_cfg, tmp_path, monkeypatch):
    from genrun.engine import train

    _signal_at(monkeypatch, 2, signal.SIGINT)  # Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        train(compose_cfg(["logger=none", "trainer.max_steps=8", "trainer.progress=off"]), tmp_path / "a")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["message"].startswith("interrupted (Ctrl-C) after 2 steps; no checkpoint was written yet")
    monkeypatch.undo()
    summary = train(compose_cfg(["logger=none", "optim=sgd", "optim.lr=1e30", "trainer.progress=off"]), tmp_path / "b")
    assert summary["status"] == "diverged" and not (tmp_path / "b" / "ckpt.pt").exists()
    assert summary["message"].endswith("; no checkpoint was written yet (the first comes at an epoch's end or "
                                       "trainer.ckpt_every)")
