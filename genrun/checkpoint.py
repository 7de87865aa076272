"""Checkpoints: written atomically, read back with `weights_only=True`, checked for origin.

A checkpoint holds everything the engine needs to continue a run bit-for-bit on the same
machine: model, optimizer, scheduler, GeN and GradScaler states, the step and the position
in the epoch, the RNG states, and `elapsed_s` (the run's seconds so far, which a resumed run's
`time_s` counts on from; 0 for a checkpoint without it).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrun import atomic
from genrun.errors import UserError

FORMAT = "genrun-checkpoint-v1"
FILENAME = "ckpt.pt"


def rng_state() -> dict[str, Any]:
    # numpy's state holds a uint32 array: stored as a tensor so weights_only loading accepts it.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write whole or not at all (`genrun.atomic`): a run killed mid-write, or a full disk, keeps its
    last checkpoint. Through a file object, so a full disk raises OSError (ENOSPC), not torch's own error."""
    atomic.replace(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


def resolve(target: str | os.PathLike) -> Path:
    """`trainer.resume` may name a run dir or a checkpoint file."""
    path = Path(target).expanduser()
    if path.is_dir() and (path / "multirun.yaml").is_file():
        raise UserError(f"trainer.resume: {path} is a sweep's dir; resume one of its runs, e.g. "
                        f"trainer.resume={path / '0'}")
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(f"trainer.resume: no checkpoint at {path}; pass a genrun run dir or its {FILENAME}")
    return path


def load(target: str | os.PathLike) -> dict[str, Any]:
    """Load a genrun checkpoint, or raise a one-line UserError saying what is wrong with it."""
    path = resolve(target)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load on junk raises many kinds; all mean "unreadable"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"trainer.resume: {path} is not a readable checkpoint ({first[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"trainer.resume: {path} was not written by genrun (no '{FORMAT}' marker)")
    return payload


def rng_of(payload: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Process `rank`'s RNG state; the checkpoint must come from as many processes as now run."""
    ranks = payload.get("rng_ranks") or [payload["rng"]]
    if len(ranks) != world:
        raise UserError(f"trainer.devices={world} but the checkpoint was written by {len(ranks)} process(es); "
                        f"resume with trainer.devices={len(ranks)}")
    return ranks[rank]
