"""`genrun`: the Hydra entry point. Validates the config, runs the engine, reports in one screen.

Bad input (a UserError) prints one line and exits 2, removing the run dir Hydra had just
made if the run wrote nothing to it. A diverged single run exits 3; in a sweep the other
jobs go on and the diverged one is recorded as such in its summary.json. Ctrl-C exits 130
with the command that continues the run.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from genrun import CONF_DIR
from genrun.errors import UserError, as_user_error
from genrun.overrides import COMPOSITION_ERRORS, explain, override_key

_RUN_FILES = {"metrics.jsonl", "gen.jsonl", "summary.json", "ckpt.pt"}


def _discard_if_unused(run_dir: Path | None, sweep_dir: Path | None = None) -> None:
    """Remove a run dir that holds only what Hydra wrote (a failed start leaves no half run).

    A sweep's dir goes too when nothing but Hydra's multirun.yaml is left in it, and so does
    an emptied date folder of the default `outputs/[multirun/]<date>/<time>` layout; any other
    parent (a dir the user named, the working dir) stays.
    """
    last = run_dir
    if run_dir is not None and run_dir.is_dir() and not any((run_dir / name).exists() for name in _RUN_FILES):
        shutil.rmtree(run_dir, ignore_errors=True)
    if sweep_dir is not None and sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(sweep_dir, ignore_errors=True)
        last = sweep_dir
    date = last.parent if last is not None else None
    if date is not None and re.fullmatch(r"\d{4}-\d{2}-\d{2}", date.name) and date.is_dir() and not any(date.iterdir()):
        date.rmdir()
        if date.parent.name == "multirun" and not any(date.parent.iterdir()):
            date.parent.rmdir()


def _sweep_dir_since(argv: list[str], since: float) -> Path | None:
    """The sweep dir Hydra made (it writes multirun.yaml before composing the jobs) for a
    sweep whose composition then failed: `hydra.sweep.dir` with `${now:...}` at each second
    since the start. None when the pattern has other interpolations."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.sweep.dir=")]
    pattern = given[-1] if given else str(OmegaConf.to_container(
        OmegaConf.load(Path(CONF_DIR) / "config.yaml"), resolve=False)["hydra"]["sweep"]["dir"])
    for second in range(int(since) - 1, int(time.time()) + 2):
        moment = datetime.fromtimestamp(second)
        text = re.sub(r"\$\{now:([^}]*)\}", lambda m: moment.strftime(m.group(1)), pattern)
        if "${" in text:
            return None
        if Path(text, "multirun.yaml").is_file() and Path(text).stat().st_mtime >= since - 1:
            return Path(text)
    return None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _run(cfg: DictConfig) -> dict | None:
    from genrun.parallel import launch, rank, shared_path  # imported late so `--help` stays quick

    _users_hydra_errors()
    hc = HydraConfig.get()
    run_dir = shared_path(Path(hc.runtime.output_dir))  # under torchrun: rank 0's, on every rank
    sweep = hc.mode == RunMode.MULTIRUN
    who = "genrun" if rank() == 0 else f"genrun (rank {rank()})"
    try:
        from genrun.validate import validate

        validate(cfg)
        summary = launch(
            cfg,
            run_dir,
            group=Path(hc.sweep.dir).name if sweep else None,
            name=hc.job.override_dirname or "defaults",
        )
    except (UserError, InstantiationException) as err:
        # a task's or model's own check fails inside hydra's instantiate, which wraps it
        cause = as_user_error(err)
        if cause is None:
            raise
        if rank() == 0:
            _discard_if_unused(run_dir, Path(hc.sweep.dir) if sweep else None)
        print(f"{who}: error: {cause}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if rank() > 0:
            sys.exit(130)
        _discard_if_unused(run_dir)
        hint = f"; continue with: genrun trainer.resume={run_dir}" if (run_dir / "ckpt.pt").exists() else ""
        print(f"\ngenrun: interrupted{hint}", file=sys.stderr)
        sys.exit(130)
    if rank() > 0:  # rank 0 reports
        return summary
    _report(summary)
    if summary["status"] == "diverged" and not sweep:
        sys.exit(3)
    return summary


#: The user's own HYDRA_FULL_ERROR, kept while genrun sets it to make Hydra raise what it cannot
#: compose (worded by `genrun.overrides`); an environment variable, so joblib's workers see it too.
_USERS_FULL_ERROR = "GENRUN_USERS_HYDRA_FULL_ERROR"


def _users_hydra_errors() -> None:
    """Inside the job: the user's setting again, so Hydra reports a job's own errors as it always does."""
    users = os.environ.get(_USERS_FULL_ERROR, "")
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
    print("\n".join(lines), file=sys.stderr if summary["status"] != "finished" else sys.stdout)


def _route_resume(argv: list[str]) -> list[str]:
    """`trainer.resume=DIR` continues the run in DIR itself with the overrides it was started
    with (those given now win), so a run's files stay in one place and its config is kept."""
    resume = [arg for arg in argv if arg.startswith("trainer.resume=")]
    if not resume or "-m" in argv or "--multirun" in argv:
        return argv
    target = Path(resume[-1].split("=", 1)[1]).expanduser()
    run_dir = target.parent if target.is_file() else target
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not run_dir.is_dir():
        return argv
    given = {override_key(arg) for arg in argv}
    previous = OmegaConf.load(saved) if saved.is_file() else []
    kept = [o for o in previous if override_key(o) not in given and override_key(o) != "hydra.run.dir"]
    run_dir_arg = [] if "hydra.run.dir" in given else [f"hydra.run.dir={run_dir}"]
    return [*kept, *argv, *run_dir_arg]


#: Under torchrun, ranks > 0 let rank 0's Hydra make the run dir, write .hydra/ and the log.
OTHER_RANKS = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
               "hydra/hydra_logging=disabled"]


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
    argv = _route_resume(sys.argv[1:])
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's variables
        argv = _join_torchrun(argv)
    sys.argv = [sys.argv[0], *argv]
    os.environ.setdefault(_USERS_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", ""))
    hydra_traceback, started = os.environ[_USERS_FULL_ERROR] == "1", time.time()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises composition errors; we word them in one line
    try:
        _run()
    except Exception as err:
        if isinstance(err, COMPOSITION_ERRORS) and not hydra_traceback:
            message = explain(err, argv)
            made = _sweep_dir_since(argv, started) if "-m" in argv or "--multirun" in argv else None
            if made is not None:
                _discard_if_unused(None, made)
        elif isinstance(err, ValueError) and str(err).startswith("Only one of --run, --multirun"):
            message = str(err)  # Hydra raises (rather than reports) two of its modes at once, e.g. `-m --info`
        else:
            raise
        print(f"genrun: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
