"""Argument checks for :class:`genrun.gen.GeN`, with messages that name the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

from .guard import GUARD_RULES

HORIZONS = (None, "none", "linear", "cosine")


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def check_points(points: Sequence[float], slope: bool) -> tuple[float, ...]:
    """Probe multipliers: finite, distinct, and enough non-zero ones for the fit."""
    try:
        pts = tuple(float(s) for s in points)
    except (TypeError, ValueError):
        raise ValueError(f"points must be a sequence of numbers, got {points!r}") from None
    if not pts or not all(math.isfinite(s) for s in pts):
        raise ValueError(f"points must be a non-empty sequence of finite numbers, got {points!r}")
    if len(set(pts)) != len(pts):
        raise ValueError(f"points must be distinct, got {points!r}")
    nonzero = sum(1 for s in pts if s != 0.0)
    if slope and nonzero < 1:
        raise ValueError(f"points must contain at least one non-zero multiplier, got {points!r}")
    if not slope and nonzero < 2:
        raise ValueError(
            f"points must contain at least two distinct non-zero multipliers when slope=False "
            f"(two unknowns a and β), got {points!r}"
        )
    return pts


def check_guard(guard: Any) -> frozenset[str]:
    """The guard's rules: True (all), False (none) or a collection of rule names."""
    if isinstance(guard, bool):
        return frozenset(GUARD_RULES) if guard else frozenset()
    names = list(guard) if isinstance(guard, (list, tuple, set, frozenset)) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(f"guard must be True, False or a list of rule names {list(GUARD_RULES)}, got {guard!r}")
    unknown = sorted(set(names) - set(GUARD_RULES))
    if unknown:
        raise ValueError(f"guard has unknown rules {unknown}: choose from {list(GUARD_RULES)}")
    return frozenset(names)


def check_arguments(
    optimizer: Any,
    *,
    every: Any,
    smoothing: Any,
    points: Any,
    min_r2: Any,
    max_change: Any,
    slope: Any,
    mode: Any,
    horizon: Any,
    total_steps: Any,
    init_search: Any,
    snapshot: Any,
    model: Any,
    scaler: Any,
    probe: Any,
    distributed: Any,
    sharded: Any,
    history_size: Any = None,
) -> tuple[float, ...]:
    """Raise ValueError/TypeError for a bad argument; return the normalised points.

    ``guard`` is checked, and turned into its rules, by :func:`check_guard`."""
    if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "step")):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not _is_int(every) or every < 1:
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    if history_size is not None and (not _is_int(history_size) or history_size < 1):
        raise ValueError(f"history_size must be None or an integer >= 1, got {history_size!r}")
    if not _is_real(smoothing) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be a number in [0, 1), got {smoothing!r}")
    if min_r2 is not None and (not _is_real(min_r2) or not min_r2 <= 1.0):
        raise ValueError(f"min_r2 must be None or a number <= 1, got {min_r2!r}")
    if max_change is not None and (not _is_real(max_change) or not max_change > 1.0):
        raise ValueError(f"max_change must be None or a number > 1, got {max_change!r}")
    for name, value in (("slope", slope), ("init_search", init_search), ("sharded", sharded)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if mode not in ("fit", "exact"):
        raise ValueError(f"mode must be 'fit' or 'exact', got {mode!r}")
    if horizon not in HORIZONS:
        raise ValueError(f"horizon must be one of None, 'none', 'linear', 'cosine', got {horizon!r}")
    if total_steps is not None and (not _is_int(total_steps) or total_steps < 1):
        raise ValueError(f"total_steps must be None or an integer >= 1, got {total_steps!r}")
    if probe not in ("next", "same"):
        raise ValueError(f"probe must be 'next' or 'same', got {probe!r}")
    if probe == "next" and (mode != "fit" or init_search):
        raise ValueError("mode='exact' and init_search=True are options of probe='same' (Algorithm 1's probes)")
    if snapshot not in ("device", "cpu"):
        raise ValueError(f"snapshot must be 'device' or 'cpu', got {snapshot!r}")
    if distributed not in ("auto", True, False):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
    if model is not None and not hasattr(model, "modules"):
        raise ValueError(f"model must be None or a torch.nn.Module, got {type(model).__name__}")
    if scaler is not None and not callable(getattr(scaler, "step", None)):
        raise ValueError(f"scaler must be None or a GradScaler (an object with .step(optimizer)), got {scaler!r}")
    return check_points(points, slope if mode == "fit" else True)
