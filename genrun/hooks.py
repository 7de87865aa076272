"""The Hydra callback that checks a run before Hydra writes anything (`hydra.callbacks` in conf/config.yaml).

`on_run_start` runs after Hydra composes the config and before it makes the run dir and writes
`.hydra/`: it validates the config (so a bad override never lands in a run's saved overrides, which
`trainer.resume` reuses), checks that a `trainer.resume` target has a checkpoint, and claims the run
dir (`genrun.rundir`): an automatic name is made unique, a dir that holds another run is refused, the
dir is locked. `on_multirun_start` composes and validates every job of a sweep before the first one
starts, then claims the sweep dir the same way.

Hydra turns an exception raised in a callback into a warning and goes on, so a refusal is raised as
`Refused`, a BaseException, which `genrun.cli.main` prints as one line with exit status 2.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from genrun import rundir
from genrun.errors import UserError

#: The user's own HYDRA_FULL_ERROR, kept while genrun sets it to make Hydra raise what it cannot
#: compose (worded by `genrun.overrides`); an environment variable, so joblib's workers see it too.
USERS_FULL_ERROR = "GENRUN_USERS_HYDRA_FULL_ERROR"


class Refused(BaseException):
    """Bad input found before Hydra wrote anything: `genrun: error: <message>`, exit 2."""


class Guard(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from genrun.parallel import rank

        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the config and the dir's name
        with _refusing():
            _validate(config)
            if rank() == 0:  # under torchrun the other ranks use rank 0's dir
                _claim_run_dir(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with _refusing():
            _validate_jobs(config)
            _claim_sweep_dir(config)


@contextlib.contextmanager
def _refusing() -> Iterator[None]:
    try:
        yield
    except UserError as err:
        raise Refused(str(err)) from None


def _validate(config: DictConfig) -> None:
    from genrun.validate import validate

    validate(config)


def _claim_run_dir(config: DictConfig) -> None:
    from genrun import checkpoint

    target = config.trainer.get("resume")
    resumed = Path(os.path.realpath(checkpoint.resolve(target).parent)) if target else None
    fresh = "${now:" in _unresolved(config.hydra.run, "dir") and resumed is None
    taken = rundir.claim(str(config.hydra.run.dir), key="hydra.run.dir", fresh=fresh)
    if not taken.new and taken.path != resumed and rundir.holds_run(taken.path):
        taken.release()
        raise UserError(f"hydra.run.dir={taken.path} already holds a run; continue it with `genrun "
                        f"trainer.resume={taken.path}`, or choose another hydra.run.dir")
    with read_write(config.hydra):
        config.hydra.run.dir = str(taken.path)


def _claim_sweep_dir(config: DictConfig) -> None:
    fresh = "${now:" in _unresolved(config.hydra.sweep, "dir")
    taken = rundir.claim(str(config.hydra.sweep.dir), key="hydra.sweep.dir", fresh=fresh)
    if not taken.new and rundir.holds_sweep(taken.path):
        taken.release()
        raise UserError(f"hydra.sweep.dir={taken.path} already holds a sweep or runs; choose another "
                        "hydra.sweep.dir (genrun-report reads the runs that are there)")
    with read_write(config.hydra):
        config.hydra.sweep.dir = str(taken.path)
        # each job's config is composed again from these overrides: they must name the claimed dir
        config.hydra.overrides.hydra.append(f"hydra.sweep.dir={_quoted(taken.path)}")
    os.environ[rundir.SWEEP_ENV] = str(taken.path)


def _validate_jobs(config: DictConfig) -> None:
    """Compose every job of a basic sweep as Hydra will, and validate it: one bad value is refused
    before the first job starts. Other sweepers choose their jobs as they go; each job validates itself."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from genrun.overrides import COMPOSITION_ERRORS, explain

    if not str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).endswith(".BasicSweeper"):
        return
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    loader = GlobalHydra.instance().config_loader()
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    try:
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
        for job in (job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch):
            _validate(loader.load_sweep_config(config, list(job)))
    except COMPOSITION_ERRORS as err:
        if os.environ.get(USERS_FULL_ERROR) == "1":
            return  # the user asked for Hydra's own report, which the sweep's start gives
        raise UserError(explain(err, arguments)) from None


def _unresolved(node: DictConfig, key: str) -> str:
    return str(OmegaConf.to_container(node, resolve=False)[key])


def _quoted(path: Path) -> str:
    """`path` as a quoted value of Hydra's override grammar (a path may hold `,` or `=`)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"
