"""Data-parallel training: `trainer.devices=N` processes on this machine, or torchrun's.

`trainer.devices=N`: the Hydra job spawns N processes and waits for them. Under torchrun
(`torchrun --nproc_per_node=N -m genrun.cli ...`, one or several machines), every process
runs the `genrun` command itself: all join torchrun's process group before Hydra starts, and
ranks > 0 leave the run dir to rank 0 (DESIGN: Hydra would make one per rank). Either way
each process builds the same task and model, wraps the model in DistributedDataParallel
(NCCL for GPU tensors, gloo for CPU ones) and trains on its share of every batch; process 0
writes the run's files. GeN averages its probe losses over the processes, so every replica
takes the same lr (genrun.gen.distributed).

Outside a process group every helper here is the single-process identity, so the engine
reads the same with one process or many.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.config
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf
from torch import nn

from genrun.errors import UserError, as_user_error
from genrun.tasks.base import Share


def launch(cfg: DictConfig, run_dir: Path, *, group: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Train with `cfg.trainer.devices` processes; return process 0's summary."""
    from genrun.engine import train

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
    from genrun import stop

    if isinstance(err, stop.Stopped):
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, err.signum)
    for process in processes:
        process.join(timeout=120)


def check_devices(device: str, devices: int) -> None:
    """One process per GPU: there must be `devices` GPUs when training on them."""
    from genrun.runtime import pick_device

    if pick_device(device).type == "cuda" and devices > torch.cuda.device_count():
        raise UserError(f"trainer.devices={devices} but {torch.cuda.device_count()} GPU(s) are visible; "
                        f"set trainer.devices <= {torch.cuda.device_count()}")


def _worker(rank: int, world: int, port: int, cfg: DictConfig, run_dir: Path,
            group: str | None, name: str | None, errors: Any, logs: dict[str, Any] | None) -> None:
    from genrun import stop
    from genrun.engine import train
    from genrun.runtime import pick_device

    stop.install()  # SIGTERM as Ctrl-C: process 0 records the run as interrupted
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # as torchrun sets them
    if rank == 0 and logs:  # process 0 logs as the Hydra job would have: console and genrun.log
        logging.config.dictConfig(logs)
    elif rank > 0:  # the others would repeat process 0's warnings
        logging.getLogger().setLevel(logging.ERROR)
    if pick_device(cfg.trainer.device).type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(_backend(), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
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


def _backend() -> str:
    # NCCL for GPU tensors, gloo for CPU ones (losses, RNG states, the run dir's name)
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def join_torchrun() -> None:
    """Join torchrun's process group (its MASTER_ADDR/PORT, RANK, WORLD_SIZE variables)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(_backend())


def shared_path(path: Path) -> Path:
    """Rank 0's `path` on every process (the run dir under torchrun)."""
    if world() == 1:
        return path
    data = torch.tensor(list(str(path).encode()) if rank() == 0 else [], dtype=torch.uint8)
    size = torch.tensor([data.numel()])
    dist.broadcast(size, 0)
    data = data if rank() == 0 else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, 0)
    return Path(bytes(data.tolist()).decode())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- what the engine calls; identities without a process group ---------------------------

def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    """This process's index on its machine, hence its GPU."""
    return int(os.environ.get("LOCAL_RANK", rank())) if world() > 1 else 0


def local_world() -> int:
    """How many of the processes share this machine (its cores, its GPUs)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world())) if world() > 1 else 1


def cpu_threads() -> int:
    """Torch threads per process when this machine's processes share its cores."""
    return max(1, (os.cpu_count() or 1) // local_world())


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Process 0 runs the block first (it may download files), then the others."""
    if rank() > 0:
        dist.barrier()
    yield
    if world() > 1 and rank() == 0:
        dist.barrier()


def wrap(model: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    """The model the training forward calls: DDP around `model` when there are processes."""
    if world() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
    if last or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over the processes (`value` itself is left alone)."""
    if world() == 1:
        return value.detach()
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world()


def shard(data: Any) -> Any:
    """This process's share of an evaluation split (every `world`-th example), or, for a split
    smaller than the process count, all of it (a process with no example would have no part)."""
    if world() == 1 or len(data) < world():
        return data
    return Share(data, rank(), world())


def parts(part: Any, data: Any) -> list[Any]:
    """Every process's `Task.predict` result for `data`, in rank order: gathered when `data` is
    a share, else this process's alone (it predicted the whole split, as did every other)."""
    return gather(part) if isinstance(data, Share) else [part]


def gather(obj: Any) -> list[Any]:
    """`obj` of every process, in rank order ([obj] with one process)."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out
