"""The small machinery the engine loop leans on: device, precision, seeding, batching."""

from __future__ import annotations

import contextlib
import random
import resource
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from genrun.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str, rank: int = 0) -> torch.device:
    """The device of process `rank` (data-parallel process r uses GPU r)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    return torch.device("cuda", rank) if name == "cuda" else torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16, a no-op for fp32. Training forwards and GeN probes both use it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class EpochBatches(Sampler[list[int]]):
    """Shuffled index batches for one epoch, reproducible from (seed, epoch), optionally
    starting at batch `start` so a resumed run sees exactly the batches it had not seen.

    With `world` data-parallel processes, process `rank` takes every `world`-th index of each
    batch, so the processes together see exactly the batches one process would. A batch
    smaller than `world` (an epoch's last) lends its first items to the processes it cannot
    fill: every process needs an example for the gradient all-reduce.
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.size, self.batch_size, self.start, self.rank, self.world = size, batch_size, start, rank, world
        self.generator = torch.Generator().manual_seed(seed * 100_003 + epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=self.generator).tolist()
        for first in range(self.start * self.batch_size, self.size, self.batch_size):
            batch = order[first : first + self.batch_size]
            yield batch[self.rank :: self.world] or [batch[self.rank % len(batch)]]

    def __len__(self) -> int:
        return max(0, -(-self.size // self.batch_size) - self.start)


def loader_workers(setting: int | str, device: torch.device, cores: int, heavy_items: bool) -> int:
    """DataLoader workers per process. `auto` feeds a GPU from min(8, `cores`) workers (this
    process's share of the machine) when making an item is real work (a task's `heavy_items`:
    image decoding); in-memory items need none (starting workers each epoch would cost more
    than they save), and on the CPU workers would take the model's cores."""
    if setting != "auto":
        return int(setting)
    return min(8, cores) if device.type == "cuda" and heavy_items else 0


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def params_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
