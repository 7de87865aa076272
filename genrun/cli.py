"""`genrun`: the Hydra entry point. Validates the config, runs the engine, reports in one screen.

Before Hydra writes anything, `genrun.hooks` validates the config (every job's, for a sweep) and
claims the run dir (`genrun.rundir`). Bad input (a UserError) prints one line and exits 2; a failed
start undoes exactly what this process made or changed in the run dir. A diverged single run exits
3; in a sweep the other jobs go on and the diverged one is recorded as such in its summary.json.
Ctrl-C, SIGTERM and SIGUSR1 exit 128 + the signal with the command that continues the run; a full
disk or an unwritable file is one line naming it, exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from genrun import CONF_DIR, rundir, stop
from genrun.console import say
from genrun.errors import AlreadyFinished, UserError, as_user_error
from genrun.hooks import USERS_FULL_ERROR, Refused
from genrun.overrides import COMPOSITION_ERRORS, explain, override_key


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _run(cfg: DictConfig) -> dict | None:
    from genrun.launch import launch  # imported late so `--help` stays quick
    from genrun.parallel import rank, shared_path

    _users_hydra_errors()
    hc = HydraConfig.get()
    run_dir = shared_path(Path(hc.runtime.output_dir))  # under torchrun: rank 0's, on every rank
    sweep = hc.mode == RunMode.MULTIRUN
    claim = None
    try:
        if rank() == 0:
            claim = rundir.for_job(run_dir, Path(hc.sweep.dir) if sweep else None)
        from genrun.validate import validate

        validate(cfg)
        summary = launch(
            cfg,
            run_dir,
            group=Path(hc.sweep.dir).name if sweep else None,
            name=hc.job.override_dirname or "defaults",
        )
    except BaseException as err:
        if sweep and isinstance(err, Exception) and rank() == 0:
            raise _sweep_job_failed(err, run_dir) from None
        code = _job_failed(err, run_dir, claim)
        if code is None:
            raise
        sys.exit(code)
    finally:
        if claim is not None:
            claim.release()
        if sweep:  # the sweep's end is genrun's to word again (a JobFailed Hydra raises after the last job)
            os.environ["HYDRA_FULL_ERROR"] = "1"
    if rank() > 0:  # rank 0 reports
        return summary
    _report(summary)
    if sweep:
        stop.now()  # a stop signal came during this job's last step: the next job does not start
    if summary["status"] == "diverged" and not sweep:
        sys.exit(3)
    return summary


def _job_failed(err: BaseException, run_dir: Path, claim: rundir.Claim | None) -> int | None:
    """Report a job that did not finish in one line and return its exit status (None: not ours to
    word, Hydra reports it). A failed start leaves the run dir as it was before the run: the line goes
    into genrun.log first, so that undoing the start takes it out again."""
    from genrun.parallel import rank

    user = as_user_error(err) if isinstance(err, (UserError, InstantiationException)) else None
    storage = rundir.storage_problem(err, run_dir)
    if not isinstance(err, KeyboardInterrupt) and user is None and storage is None:
        return None
    code, line = _status_line(err, user, storage, run_dir, rank())
    if line and isinstance(user, AlreadyFinished):
        print(line)  # nothing changed, the run's log included
    elif line:
        say(line, sys.stderr)
    if claim is not None:  # process 0's
        claim.discard_unless_used()
    return code


def _status_line(err: BaseException, user: UserError | None, storage: str | None, run_dir: Path,
                 rank: int) -> tuple[int, str | None]:
    """The exit status of a job that did not finish, and the line that says why (None: rank > 0's,
    which leave the telling to process 0, except for bad input each process may meet alone)."""
    if isinstance(user, AlreadyFinished):
        return 0, f"genrun: {user}" if rank == 0 else None
    if user is not None:  # a task's or model's own check fails inside hydra's instantiate, which wraps it
        return 2, f"{'genrun' if rank == 0 else f'genrun (rank {rank})'}: error: {user}"
    if rank > 0:
        return (1 if storage is not None else stop.exit_code(err)), None
    if storage is not None:
        return 1, f"genrun: error: {storage}{_resume_hint(run_dir)}"
    return stop.exit_code(err), f"\ngenrun: {stop.describe(err)}{_resume_hint(run_dir)}"


class JobFailed(Exception):
    """A sweep's job that failed: Hydra runs the sweep's other jobs, then raises the first of these."""

    def __init__(self, message: str, sweep_dir: Path) -> None:
        super().__init__(message, sweep_dir)
        self.message, self.sweep_dir = message, sweep_dir

    def __str__(self) -> str:
        ran = [d for d in self.sweep_dir.iterdir() if rundir.holds_run(d) and not rundir.failed_start(d)] \
            if self.sweep_dir.is_dir() else []
        if not ran:
            return f"{self.message}; no job of the sweep started, so it leaves nothing behind"
        return (f"{self.message}; the other jobs ran (a failed one said why above): `genrun-report "
                f"{self.sweep_dir}` lists each job's status")


def _sweep_job_failed(err: Exception, run_dir: Path) -> JobFailed:
    """Word a sweep job's failure in one line, and leave its dir with a summary.json that says
    so (the engine writes one for a run that failed while training; one that failed before gets
    one here), for `genrun-report` to list. A sweep none of whose jobs started leaves nothing."""
    user = as_user_error(err) if isinstance(err, (UserError, InstantiationException)) else None
    storage = rundir.storage_problem(err, run_dir)
    if user is None and storage is None:  # not bad input: a bug's traceback is what helps
        traceback.print_exception(err)
    why = (str(user) if user is not None else storage or f"{type(err).__name__}: {err}").strip()
    line = why.splitlines()[0] if why else type(err).__name__
    say(f"genrun: error: job {run_dir.name}: {line}", sys.stderr)
    if not (run_dir / "summary.json").exists():
        with contextlib.suppress(OSError):  # a full disk: the job's own error is what matters
            rundir.record_failed_start(run_dir, line)
    return JobFailed(f"job {run_dir.name} failed: {line}", run_dir.parent)


def _resume_hint(run_dir: Path) -> str:
    if (run_dir / "ckpt.pt").exists():
        return f"; continue with: genrun trainer.resume={run_dir}"
    return "; no checkpoint was written yet, so there is nothing to resume: run the command again to start over"


def _users_hydra_errors() -> None:
    """Inside the job: the user's setting again, so Hydra reports a job's own errors as it always does."""
    users = os.environ.get(USERS_FULL_ERROR, "")
    if users:
        os.environ["HYDRA_FULL_ERROR"] = users
    else:
        os.environ.pop("HYDRA_FULL_ERROR", None)


def _report(summary: dict) -> None:
    # the test split when the task has one; else every split (GLUE: dev, as it has no labelled test)
    final = summary["final"]
    shown = {"test": final["test"]} if "test" in final else final or {"test": {}}
    lr = summary["lr"][0] if summary["lr"] else float("nan")
    lines = [
        f"genrun: {summary['status']} after {summary['step']} steps in {summary['wall_time_s']:.1f} s",
        *(f"  {split}: {', '.join(f'{k} {v:.4f}' for k, v in metrics.items()) or 'not evaluated'}"
          for split, metrics in shown.items()),
        f"  final lr: {lr:.4g}   peak memory: {summary['peak_memory_mb']:.0f} MB ({summary['device']})"
        + (f" in process 0 of {summary['devices']}" if summary.get("devices", 1) > 1 else ""),
        f"  run dir: {summary['run_dir']}",
    ]
    if summary.get("message"):
        lines.insert(1, f"  {summary['message']}")
    if summary.get("warning"):
        lines.insert(1, f"  warning: {summary['warning']}")
    say("\n".join(lines), sys.stderr if summary["status"] != "finished" else sys.stdout)


def _route_resume(argv: list[str]) -> list[str]:
    """`trainer.resume=DIR` continues the run in DIR itself with the overrides it was started
    with (those given now win), so a run's files stay in one place and its config is kept. A
    checkpoint outside a run dir (no .hydra/config.yaml) starts a run dir of its own instead:
    genrun writes nothing into a folder it did not make for a run."""
    resume = [arg for arg in argv if arg.startswith("trainer.resume=")]
    if not resume or "-m" in argv or "--multirun" in argv:
        return argv
    target = Path(resume[-1].split("=", 1)[1]).expanduser()
    run_dir = target.parent if target.is_file() else target
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        return argv
    saved = run_dir / ".hydra" / "overrides.yaml"
    given = {override_key(arg) for arg in argv}
    previous = OmegaConf.load(saved) if saved.is_file() else []
    kept = [o for o in previous if override_key(o) not in given and override_key(o) != "hydra.run.dir"]
    run_dir_arg = [] if "hydra.run.dir" in given else [f"hydra.run.dir={run_dir}"]
    return [*kept, *argv, *run_dir_arg]


#: Under torchrun, ranks > 0 let rank 0's Hydra make the run dir, write .hydra/ and the log (the
#: loggers conf/config.yaml adds name the job logging's file handler, which `disabled` has none of).
OTHER_RANKS = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
               "~hydra.job_logging.loggers", "hydra/hydra_logging=disabled"]


def _join_torchrun(argv: list[str]) -> list[str]:
    if "-m" in argv or "--multirun" in argv:
        print("genrun: error: -m under torchrun: start one torchrun per job, or sweep with "
              "trainer.devices=N instead of torchrun", file=sys.stderr)
        sys.exit(2)
    from genrun import parallel

    parallel.join_torchrun()
    if parallel.rank() == 0:
        return argv
    mine = {override_key(o) for o in OTHER_RANKS}
    return [*(a for a in argv if override_key(a) not in mine), *OTHER_RANKS]


def main() -> None:
    if sys.argv[1:] == ["--version"]:  # Hydra's own --version would print only Hydra's
        from genrun import version_line

        print(version_line())
        return
    unknown = _unknown_option(sys.argv[1:])
    if unknown:
        _exit(f"{unknown} (`genrun --help` lists the options, groups and keys)", 2)
    argv = _route_resume(sys.argv[1:])
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's variables
        argv = _join_torchrun(argv)
    sys.argv = [sys.argv[0], *argv]
    os.environ.setdefault(USERS_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", ""))
    hydra_traceback = os.environ[USERS_FULL_ERROR] == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises composition errors; we word them in one line
    stop.install()
    failed = True
    try:
        _run()
        failed = False
    except SystemExit as done:  # a job's own exit status
        failed = done.code not in (0, None)
        raise
    except Refused as err:  # bad input the callback found before Hydra wrote anything
        _exit(str(err), 2)
    except JobFailed as err:  # after every other job of the sweep ran
        _exit(str(err), 1)
    except KeyboardInterrupt as err:  # during Hydra's start, or between a sweep's jobs
        print(f"\ngenrun: {stop.describe(err)}", file=sys.stderr)
        sys.exit(stop.exit_code(err))
    except Exception as err:
        if isinstance(err, COMPOSITION_ERRORS) and not hydra_traceback:
            _exit(explain(err, argv), 2)
        if isinstance(err, ValueError) and str(err).startswith("Only one of --run, --multirun"):
            _exit(str(err), 2)  # Hydra raises (rather than reports) two of its modes at once, e.g. `-m --info`
        storage = rundir.storage_problem(err, Path.cwd())  # e.g. Hydra writing .hydra/ on a full disk
        if storage is None:
            raise
        _exit(storage, 1)
    finally:
        rundir.close_all(failed)


def _exit(message: str, status: int) -> NoReturn:
    print(f"genrun: error: {message}", file=sys.stderr)
    sys.exit(status)


def _unknown_option(argv: list[str]) -> str | None:
    """What argparse would say (in several lines of usage) about an option Hydra does not know."""
    from hydra._internal.utils import get_args_parser

    if "--version" in argv:  # Hydra's --version action prints and exits
        return None
    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        _, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        return str(err)
    options = [arg for arg in rest if arg.startswith("-")]
    return f"unknown option {options[0]}; overrides are key=value" if options else None


if __name__ == "__main__":
    main()
