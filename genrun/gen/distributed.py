"""Making every rank agree on the probe statistics (one collective per probe step)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_active(setting: bool | str) -> bool:
    """``"auto"``: on when torch.distributed is available and a process group exists."""
    if setting == "auto":
        return dist.is_available() and dist.is_initialized()
    if setting and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("GeN(distributed=True) needs an initialised torch.distributed process group")
    return bool(setting)


def reduce_stats(stats: Tensor, summed: int) -> Tensor:
    """All-reduce ``stats``: the first ``summed`` entries are summed, the rest averaged.

    Losses are averaged (each rank's loss is the mean over its own batch, so the
    average is the global batch's loss, what DDP's averaged gradient differentiates).
    Entries that are partial sums over a shard of the parameters (``Σ grad·δ``,
    ``‖δ‖²``, ``δᵀHδ`` under FSDP-style sharding) must be summed instead.  One
    ``SUM`` all-reduce does both (gloo has no ``AVG``); the division happens on the
    device before the single host sync, and every rank gets bit-identical values, so
    every rank picks the same lr and the replicas stay identical.
    """
    gloo_cuda = dist.get_backend() == "gloo" and stats.device.type != "cpu"
    work = stats.cpu() if gloo_cuda else stats.clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    world = dist.get_world_size()
    scale = torch.full_like(work, 1.0 / world)
    scale[:summed] = 1.0
    return (work * scale).to(stats.device)
