"""Starting the training: one process, or `trainer.devices=N` data-parallel processes on this machine.

`trainer.devices=N`: the Hydra job spawns N processes, each running `genrun.engine.train` inside
its own process group, and waits for them; process 0 writes the run's files. Under torchrun the
processes already exist (`genrun.cli` joins them to torchrun's group), so this only trains.
The per-process helpers the engine calls (ranks, shards, gathers) are `genrun.parallel`.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from genrun import parallel, stop
from genrun.engine import train
from genrun.errors import UserError, as_user_error
from genrun.runtime import pick_device


def launch(cfg: DictConfig, run_dir: Path, *, group: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Train with `cfg.trainer.devices` processes; return process 0's summary."""
    devices = cfg.trainer.devices
    if dist.is_initialized() and devices > 1:
        raise UserError(f"trainer.devices={devices} under torchrun: torchrun starts the processes "
                        "(--nproc_per_node); leave trainer.devices=1")
    if devices == 1:
        return train(cfg, run_dir, group=group, name=name)
    check_devices(cfg.trainer.device, devices)
    # resolved here: the processes have no Hydra context for ${hydra:...} or ${now:...}
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if mp.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
        # inside a joblib/loky sweep job the default is "loky", which the spawned children cannot
        # resolve when they unpickle their start-up data
        mp.set_start_method("spawn", force=True)
    errors = mp.get_context("spawn").SimpleQueue()
    logs = _job_logging()
    # torch logs a warning as it stops the other processes after one failed: the error says it all
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    context = mp.start_processes(_worker, args=(devices, _free_port(), plain, run_dir, group, name, errors, logs),
                                 nprocs=devices, start_method="spawn", join=False)
    try:
        while not context.join():
            pass
    except KeyboardInterrupt as err:
        _stop_processes(context.processes, err)
        raise
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        if not errors.empty():  # a process met bad input; the others were stopped
            raise errors.get() from None  # the UserError itself: AlreadyFinished stays what it is
        raise
    return json.loads((run_dir / "summary.json").read_text())


def _stop_processes(processes: list[Any], err: KeyboardInterrupt) -> None:
    """Pass a stop signal this process got on to the training processes (Ctrl-C reached them with it:
    a terminal signals the whole group), then wait while process 0 records the run as interrupted."""
    if isinstance(err, stop.Stopped):
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, err.signum)
    for process in processes:
        process.join(timeout=120)


def check_devices(device: str, devices: int) -> None:
    """One process per GPU: there must be `devices` GPUs when training on them."""
    if pick_device(device).type == "cuda" and devices > torch.cuda.device_count():
        raise UserError(f"trainer.devices={devices} but {torch.cuda.device_count()} GPU(s) are visible; "
                        f"set trainer.devices <= {torch.cuda.device_count()}")


def _worker(rank: int, world: int, port: int, cfg: DictConfig, run_dir: Path,
            group: str | None, name: str | None, errors: Any, logs: dict[str, Any] | None) -> None:
    stop.install()  # SIGTERM as Ctrl-C: process 0 records the run as interrupted
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # as torchrun sets them
    if rank == 0 and logs:  # process 0 logs as the Hydra job would have: console and genrun.log
        logging.config.dictConfig(logs)
    elif rank > 0:  # the others would repeat process 0's warnings
        logging.getLogger().setLevel(logging.ERROR)
    if pick_device(cfg.trainer.device).type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(parallel.backend(), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train(cfg, run_dir, group=group, name=name)
    except Exception as err:  # noqa: BLE001 - only bad input is turned into a message; the rest re-raises
        user = explain(err)
        if user is None:
            raise
        errors.put(user)
        sys.exit(2)  # a non-zero exit makes the launcher stop the other processes
    finally:
        dist.destroy_process_group()


def explain(err: BaseException) -> UserError | None:
    """The one-line error for what a process met: bad input, or DDP finding unused parameters."""
    if isinstance(err, RuntimeError) and "find_unused_parameters=True" in str(err):
        return UserError("the model has trainable parameters that get no gradient in a step, which DDP "
                         "must be told of: set trainer.ddp_find_unused=true")
    return as_user_error(err)


def _job_logging() -> dict[str, Any] | None:
    """The Hydra job's logging config, resolved (its file handler names the run dir's log)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True)  # type: ignore[return-value]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
