"""Per-process helpers of data-parallel training: ranks, shares of the data, gathers.

`trainer.devices=N` processes on this machine (`genrun.launch` spawns them), or torchrun's
(`torchrun --nproc_per_node=N -m genrun.cli ...`, one or several machines: every process runs
the `genrun` command itself, all join torchrun's process group before Hydra starts, and ranks > 0
leave the run dir to rank 0, as Hydra would make one per rank). Either way each process builds
the same task and model, wraps the model in DistributedDataParallel (NCCL for GPU tensors, gloo
for CPU ones) and trains on its share of every batch; process 0 writes the run's files. GeN
averages its probe losses over the processes, so every replica takes the same lr
(genrun.gen.distributed).

Outside a process group every helper here is the single-process identity, so the engine
reads the same with one process or many.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset


def backend() -> str:
    # NCCL for GPU tensors, gloo for CPU ones (losses, RNG states, the run dir's name)
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def join_torchrun() -> None:
    """Join torchrun's process group (its MASTER_ADDR/PORT, RANK, WORLD_SIZE variables)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend())


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


class Share(Dataset):
    """Every `count`-th item of `whole` from `index` on: one process's share of an evaluation split.

    A task whose evaluation is not one result per item reads `whole`, `index` and `count` to
    split that work the same way (text generation decodes each distinct prompt once).
    """

    def __init__(self, whole: Dataset, index: int, count: int) -> None:
        self.whole, self.index, self.count = whole, index, count

    def __len__(self) -> int:
        return len(range(self.index, len(self.whole), self.count))  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.whole[self.index + i * self.count]


def in_split_order(parts: list[list[Any]]) -> list[Any]:
    """Per-item results of every share (in share order) back in the split's order: share i
    holds items i, i + n, i + 2n, ..., so the split is their round robin."""
    longest = max((len(p) for p in parts), default=0)
    return [part[j] for j in range(longest) for part in parts if j < len(part)]


def share_of(data: Dataset) -> tuple[Dataset, int, int]:
    """(whole split, index, count) of `data`, a `Share` or a whole split (0, 1)."""
    return (data.whole, data.index, data.count) if isinstance(data, Share) else (data, 0, 1)
