"""What genrun guarantees about a user's files whatever goes wrong: bad input in a dir of theirs, runs
that share a dir, resumes that fail or have nothing to do, sweeps with a bad value, stop signals, a
full disk, a dir that cannot be written.

genrun runs as a user runs it (a subprocess; the `genrun` fixture also checks that no call removes a
file that was there before it). Faults that cannot be caused from outside, a full disk or a signal at
a chosen step, are injected by a few lines of Python run before genrun's `main`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import GENRUN, PATIENCE, tree

QUIET = ["trainer.progress=off", "logger=none"]
RUN = ["trainer.max_steps=4", "trainer.ckpt_every=2", "seed=3", *QUIET]
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def one_line_error(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    assert proc.returncode == status, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genrun: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run that trained all its steps, checkpointed at steps 2 and 4; tests work on copies."""
    run = tmp_path_factory.mktemp("finished") / "run"
    proc = subprocess.run([str(GENRUN), *RUN, f"hydra.run.dir={run}"], env=ENV, capture_output=True, text=True,
                          timeout=PATIENCE)
    assert proc.returncode == 0, proc.stderr
    return run


def copy_of(run: Path, where: Path) -> Path:
    return Path(shutil.copytree(run, where / "run"))


# -- 1. nothing that existed before a run is removed -------------------------------------------------

def test_bad_input_in_a_users_own_dir_leaves_it_as_it_was(genrun, tmp_path):
    mine = tmp_path / "p"
    mine.mkdir()
    (mine / "notes").write_text("x")
    cifar = ["task=cifar10", "task.data_dir=nowhere"]  # bad input found while building, after Hydra wrote .hydra/
    for args in (["hydra.run.dir=.", "optim.lr=abc"], ["hydra.run.dir=.", *cifar],
                 ["hydra.run.dir=sub/..", "trainer.batch_size=0"], ["hydra.run.dir=sub/..", *cifar]):
        one_line_error(genrun(*args, cwd=mine))
        assert tree(mine) == {"notes": b"x"} and [p.name for p in mine.iterdir()] == ["notes"], args


def test_ctrl_c_in_the_first_seconds_leaves_a_users_dir_as_it_was(genrun, tmp_path):
    mine = tmp_path / "p"
    mine.mkdir()
    (mine / "notes").write_text("x")
    ctrl_c_while_loading = ("import os, signal\nfrom genrun.tasks import vision\n"
                            "vision.Digits.datasets = lambda self: os.kill(os.getpid(), signal.SIGINT)")
    for args in (["hydra.run.dir=."], []):  # the user's dir; outputs/<date>/<time>, made by this run
        proc = genrun(*args, *QUIET, cwd=mine, python=ctrl_c_while_loading)
        assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            "genrun: interrupted; no checkpoint was written yet, so there is nothing to resume: run the command "
            "again to start over")
        assert [p.name for p in mine.iterdir()] == ["notes"], args


def test_resuming_a_sweep_dir_or_a_foreign_checkpoint_changes_nothing(genrun, tmp_path):
    sweep = tmp_path / "outputs" / "multirun" / "2026-01-01" / "10-00-00"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "0" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (sweep / "0" / "summary.json").write_text('{"status": "finished"}\n')
    (tmp_path / "ckpts").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "ckpts" / "foreign.pt")
    (tmp_path / "ckpts" / "other.txt").write_text("mine")
    before = tree(tmp_path)
    line = one_line_error(genrun("trainer.resume=outputs/multirun/2026-01-01/10-00-00", *QUIET))
    assert ("is a sweep's dir; resume one of its runs, e.g. trainer.resume=outputs/multirun/2026-01-01/10-00-00/0"
            in line)
    line = one_line_error(genrun("trainer.resume=ckpts/foreign.pt", *QUIET))
    assert "ckpts/foreign.pt was not written by genrun" in line
    assert tree(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["multirun"]  # no run dir was left


def test_a_sweep_that_fails_in_a_users_dir_leaves_it_as_it_was(genrun, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes").write_text("x")
    # bad input that only building the task finds: each job fails on it, and no job having started,
    # the sweep leaves the dir as it was
    proc = genrun("-m", "seed=0,1", "task=cifar10", "task.data_dir=nowhere", f"hydra.sweep.dir={mine}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("genrun: error: ")]
    assert proc.returncode == 1 and len(errors) == 3, proc.stderr
    assert errors[0].startswith("genrun: error: job 0: task.data_dir: no CIFAR-10 at")
    assert errors[-1].endswith("no job of the sweep started, so it leaves nothing behind")
    assert "Traceback" not in proc.stderr
    assert tree(mine) == {"notes": b"x"} and [p.name for p in mine.iterdir()] == ["notes"]


# -- 2. runs never share a dir -------------------------------------------------------------------------

def test_runs_started_at_once_get_a_dir_each_and_a_dir_in_use_is_refused(genrun, tmp_path):
    from genrun import rundir

    # a name that two runs share when started in the same year, as outputs/<date>/<time> in the same second
    procs = [subprocess.Popen([str(GENRUN), "trainer.max_steps=5", f"seed={seed}", "trainer.progress=off",
                               "hydra.run.dir=out/${now:%Y}"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=PATIENCE)
        assert proc.returncode == 0, err
    year = time.strftime("%Y")
    dirs = sorted((tmp_path / "out").iterdir())
    assert [d.name for d in dirs] == [year, f"{year}-1"]
    for run in dirs:  # each run whole: 5 train rows and the final evaluation, a summary of its own seed
        assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 5 + 1
        assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    seeds = {(d / ".hydra" / "overrides.yaml").read_text().count("seed=1") for d in dirs}
    assert seeds == {0, 1}

    before = tree(tmp_path / "out")
    line = one_line_error(genrun("trainer.max_steps=5", f"hydra.run.dir=out/{year}", *QUIET))
    assert f"out/{year} already holds a run; continue it with `genrun trainer.resume=" in line
    held = rundir.claim(dirs[0], key="hydra.run.dir")  # as a running genrun holds it
    try:
        line = one_line_error(genrun(f"trainer.resume=out/{year}", "trainer.max_steps=6"))
        assert "is in use by another running genrun" in line
    finally:
        held.release()
    assert tree(tmp_path / "out") == before


# -- 3, 4. resuming: nothing to do changes nothing; a failed resume saves nothing --------------------

def test_resuming_a_finished_run_says_so_and_changes_nothing(genrun, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = tree(run)
    proc = genrun("trainer.resume=run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("genrun: run has already trained 4 of 4 steps; nothing changed (raise "
                                   "trainer.max_steps or trainer.epochs to train longer)")
    assert tree(run) == before


def test_a_failed_resume_saves_nothing_and_the_plain_resume_still_works(genrun, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = tree(run)
    assert "optim.lr=abc is invalid" in one_line_error(genrun("trainer.resume=run", "optim.lr=abc"))
    assert tree(run) == before
    # found only when the checkpoint meets the model, after Hydra has written the new overrides
    assert "does not fit" in one_line_error(genrun("trainer.resume=run", "model.width=8", "trainer.max_steps=6"))
    assert tree(run) == before
    proc = genrun("trainer.resume=run", "trainer.max_steps=6")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "summary.json").read_text())["step"] == 6


# -- 5. a sweep is validated whole before its first job --------------------------------------------

def test_a_sweep_with_one_bad_value_runs_no_job(genrun, tmp_path):
    proc = genrun("-m", "optim=sgd", "optim.lr=0.05,abc", "trainer.max_steps=2", *QUIET)
    assert not (tmp_path / "outputs").exists()  # not even the first job's dir: no job started
    assert one_line_error(proc) == "genrun: error: optim.lr=abc is invalid: must be a finite number > 0"


# -- 6, 14. SIGTERM: the step ends, is checkpointed, and resume continues it bit for bit -------------

SIGTERM_AFTER_STEP_1 = """
import os, signal
from genrun import sinks
log = sinks.JsonlSink.log
def log_then_term(self, record):
    log(self, record)
    if record["kind"] == "train" and record["step"] == 1:
        os.kill(os.getpid(), signal.SIGTERM)
sinks.JsonlSink.log = log_then_term
"""


def test_sigterm_checkpoints_the_step_and_resume_finishes_the_run_bit_for_bit(genrun, finished, tmp_path):
    run = tmp_path / "run"
    proc = genrun(*RUN, f"hydra.run.dir={run}", python=SIGTERM_AFTER_STEP_1)
    assert proc.returncode == 143 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"genrun: stopped by SIGTERM; continue with: genrun trainer.resume={run}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == 1
    assert summary["message"] == "stopped by SIGTERM after 1 steps; the last good checkpoint (step 1) is kept"
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 1  # trainer.ckpt_every=2 alone: step 2

    assert genrun(f"trainer.resume={run}").returncode == 0
    a, b = (torch.load(d / "ckpt.pt", weights_only=True)["model"] for d in (finished, run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    def untimed(run_dir):  # wall-clock seconds differ between any two runs
        return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "eval_s")}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert untimed(run) == untimed(finished)


# -- 7. a full disk -------------------------------------------------------------------------------------

DISK_FULL_FROM_STEP_3 = """
import errno, os
from genrun import sinks
full, fsync, log = [], os.fsync, sinks.JsonlSink.log
def no_space():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
def fsync_unless_full(fd):
    if full:
        raise no_space()
    fsync(fd)
def log_unless_full(self, record):
    if record["step"] >= 3:
        full.append(True)
    if full:
        raise no_space()
    log(self, record)
os.fsync, sinks.JsonlSink.log = fsync_unless_full, log_unless_full
"""


def test_a_full_disk_is_one_line_naming_it_and_keeps_the_last_good_checkpoint(genrun, tmp_path):
    run = tmp_path / "run"
    line = one_line_error(genrun(*RUN, "logger=csv", f"hydra.run.dir={run}", python=DISK_FULL_FROM_STEP_3), status=1)
    assert line.startswith("genrun: error: the disk at /") and " is full (No space left on device " in line
    assert line.endswith(f"free space there; continue with: genrun trainer.resume={run}")
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 2  # the checkpoint of step 4 could not be
    assert not (run / "summary.json").exists()  # neither could the summary: none rather than an empty one
    assert not list(run.glob("*.tmp"))


# -- 9, 15. a dir that cannot be made, an unknown option -----------------------------------------------

def test_a_run_dir_that_cannot_be_made_is_one_line(genrun, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for key, path in (("hydra.run.dir", tmp_path / "a-file" / "run"), ("hydra.run.dir", tmp_path / ("x" * 300)),
                      ("hydra.sweep.dir", tmp_path / "a-file" / "sweep")):
        line = one_line_error(genrun(*(["-m"] if "sweep" in key else []), *QUIET, f"{key}={path}"))
        assert line.startswith(f"genrun: error: {key}={path}: cannot make or write this dir (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "notes-of-the-user.txt"]


def test_an_unknown_option_is_one_line_pointing_at_help(genrun):
    line = one_line_error(genrun("--frobnicate", "seed=1"))
    assert line == ("genrun: error: unknown option --frobnicate; overrides are key=value (`genrun --help` lists the "
                    "options, groups and keys)")
