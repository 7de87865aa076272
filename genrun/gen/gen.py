"""``GeN``: the Generalized Newton step size (Bu & Xu, ICLR 2025) around any optimizer."""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import distributed_active, reduce_stats
from .nextbatch import NextBatch
from .probe import rng_state
from .samebatch import SameBatch
from .validate import check_arguments, check_guard

Closure = Callable[[], Any]


class GeN:
    """Sets the learning rate of ``optimizer`` to ``η* = Gᵀd / dᵀHd`` along its own update d.

    G, H: the loss's gradient and Hessian; d: the base optimizer's update per unit lr; η*
    minimises the local quadratic model of the loss along d (3.1).  Every Φ = ``every`` calls,
    after the base step ``δ = w_t - w_{t+1}``:

    1. probe the training batch's loss at ``w_t - s·δ`` for s in ``points`` (no-grad forwards);
    2. fit ``ΔL(s) ≈ (a/2)s² - βs`` (β = gᵀδ exact from the gradient when ``slope``);
    3. if a > 0, β > 0 and R² ≥ ``min_r2``: ``η ← γη + (1-γ)·h_t·η·β/a`` (γ = ``smoothing``,
       h_t the ``horizon`` factor), moved by at most ``max_change``;
    4. rescale the step just taken to the new lr; ``guard`` adds the rules of
       :mod:`genrun.gen.guard` (backtrack a step that raised the probed loss, and so on).

    ``GeN.algorithm1(optimizer)`` is Algorithm 1 as printed.  ``probe="next"`` measures the
    slope on the next call's batch instead (:mod:`genrun.gen.nextbatch`).

    Args:
        optimizer: any ``torch.optim`` optimizer whose update is ``w -= lr·u(state, grad)``;
            every param group's lr is scaled by the same factor, so their ratios survive.
        every: Φ, probe every Φ-th call (4).
        smoothing: γ, the weight of the old lr in step 3 (0.9).
        max_change: the lr moves by at most this factor per probe (2.0; None: unbounded).
        horizon: ``"cosine"`` (default) or ``"linear"``: η* times a factor falling from 1 to 0
            over ``total_steps`` (C.7); without ``total_steps`` it has no effect; None: off.
        total_steps: T, the run's length in calls, for ``horizon``.
        model: the trained module: its buffers (BatchNorm statistics) are restored after probes.
        scaler: a GradScaler; ``step`` calls ``scaler.step(optimizer)`` (the caller still calls
            ``scaler.update()``); a step it skips is not measured.
        snapshot: ``"device"`` or ``"cpu"``: where the copies of the parameters live.
        probe: ``"same"`` (the training batch, default) or ``"next"``.
        guard: the rules of :mod:`genrun.gen.guard`: True (all), False (none) or a collection
            of rule names from ``genrun.gen.GUARD_RULES``, e.g. all but ``"recover"`` to measure that rule.
        points: the multipliers s of step 1 ((-1, 0, 1)).
        min_r2: the fit's acceptance threshold (0.99; None: no R² gate).
        slope: take β from the gradient and fit only a (True).
        mode: ``"fit"`` or ``"exact"`` (a = δᵀHδ from a Hessian-vector product: Algorithm 2).
        init_search: pick η0 on an exponential grid at the first probe (C.4.2) (False).
        distributed: ``"auto"``: all-reduce the probe statistics when a process group exists.
        sharded: the parameters are FSDP-style shards (``Σ grad·δ``, ``‖δ‖²`` are summed).
        history_size: keep only this many latest records in :attr:`history` (None: all).

    ``history`` holds one plain-Python record per probe; ``state_dict()`` round-trips GeN's own
    state (the lr lives in the optimizer's).  GeN owns the lr: don't also step a scheduler.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        every: int = 4,
        smoothing: float = 0.9,
        max_change: float | None = 2.0,
        horizon: str | None = "cosine",
        total_steps: int | None = None,
        model: nn.Module | None = None,
        scaler: Any = None,
        snapshot: str = "device",
        probe: str = "same",
        guard: bool | Collection[str] = True,
        points: Sequence[float] = (-1.0, 0.0, 1.0),
        min_r2: float | None = 0.99,
        slope: bool = True,
        mode: str = "fit",
        init_search: bool = False,
        distributed: bool | str = "auto",
        sharded: bool = False,
        history_size: int | None = None,
    ) -> None:
        self.points = check_arguments(
            optimizer, every=every, smoothing=smoothing, points=points, min_r2=min_r2, max_change=max_change,
            slope=slope, mode=mode, horizon=horizon, total_steps=total_steps, init_search=init_search,
            snapshot=snapshot, model=model, scaler=scaler, probe=probe, distributed=distributed,
            sharded=sharded, history_size=history_size,
        )
        self.rules = check_guard(guard)  # the guard rules in force, by name
        self.optimizer = optimizer
        self.every, self.smoothing, self.max_change = every, smoothing, max_change
        self.horizon, self.total_steps, self.model, self.scaler = horizon, total_steps, model, scaler
        self.snapshot, self.probe, self.min_r2, self.slope, self.mode = snapshot, probe, min_r2, slope, mode
        self.init_search, self.distributed, self.sharded = init_search, distributed, sharded
        self.guard = guard
        self.history: list[dict[str, Any]] = []
        self.history_size = history_size
        self.probes = 0    # probe records ever made (history may keep only the last ones)
        self.accepted = 0  # of which accepted
        self._handed_out = 0  # probes counted when fresh_records last handed records out
        self._step = 0
        self._replay: tuple[int, dict[str, Any]] | None = None
        self._estimator: NextBatch | SameBatch = NextBatch() if probe == "next" else SameBatch()

    @classmethod
    def algorithm1(cls, optimizer: torch.optim.Optimizer, *, every: int = 4, smoothing: float = 0.9,
                   **kwargs: Any) -> GeN:
        """Algorithm 1 as printed: probes at ``{-η, 0, η}`` on the training batch, the three-point
        fit (its R² is 1 by construction), ``A > 0, b > 0, R² > 0.99``, ``η ← γη + (1-γ)η*`` with no
        clamp and no horizon, and this step rescaled to the new lr.  ``kwargs``: ``model``,
        ``scaler``, ``snapshot``, ``distributed``, ``sharded``, ``history_size``."""
        return cls(optimizer, every=every, smoothing=smoothing, probe="same", points=(-1.0, 0.0, 1.0),
                   slope=False, min_r2=0.99, max_change=None, horizon=None, guard=False, **kwargs)

    # ------------------------------------------------------------------ public API
    @property
    def lr(self) -> float:
        """Current learning rate of param group 0 (η)."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def will_probe(self) -> bool:
        """Whether the next :meth:`step` call probes (``t % every == 0``)."""
        return self._step % self.every == 0

    def remember_rng(self) -> None:
        """Call right before the training forward: this step's probes replay its dropout masks.

        Free on steps that will not probe.
        """
        if self.will_probe:
            self._replay = (self._step, rng_state())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Closure, loss: Tensor | float | None = None) -> None:
        """One training step: the base optimizer's step, exactly once, and GeN's probe when due.

        ``closure()`` returns the loss of this call's training batch at the current weights, as
        the training forward computes it (autocast inside; with gradient accumulation, the mean
        the accumulated ``.grad`` differentiates); it is called under no_grad on probe steps only.
        ``loss`` is that batch's training loss (e.g. ``loss.detach()``, unscaled): it saves a
        forward.  ``.grad`` must hold this batch's gradient, unclipped.
        """
        t = self._step
        replay = self._replay[1] if self._replay is not None and self._replay[0] == t else None
        self._replay = None
        try:
            self._estimator.step(self, t, closure, loss, replay)
        finally:
            self._step = t + 1

    def new_records(self, since: int) -> list[dict[str, Any]]:
        """The records made after the first ``since`` (compare :attr:`probes`), as far as kept."""
        fresh = self.probes - since
        return self.history[len(self.history) - fresh:] if fresh > 0 else []

    def fresh_records(self) -> list[dict[str, Any]]:
        """The records made since the last call, or since construction or :meth:`load_state_dict`
        (a restored history counts as handed out), as far as kept: each record once, for a log."""
        fresh = self.new_records(self._handed_out)
        self._handed_out = self.probes
        return fresh

    def state_dict(self) -> dict[str, Any]:
        """GeN's own state (the lr itself lives in the optimizer's state_dict)."""
        return {"step": self._step, "history": copy.deepcopy(self.history), "probes": self.probes,
                "accepted": self.accepted, "probe": self.probe, "estimator": self._estimator.state_dict(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"step", "history"} - set(state)
        if missing:
            raise KeyError(f"GeN state_dict lacks {sorted(missing)}")
        if state.get("probe", self.probe) != self.probe:
            raise ValueError(f"GeN state_dict is of probe={state['probe']!r}, this GeN has probe={self.probe!r}")
        self._step = int(state["step"])
        self.history = copy.deepcopy(list(state["history"]))
        self.probes = int(state.get("probes", len(self.history)))
        self.accepted = int(state.get("accepted", sum(bool(r.get("accepted")) for r in self.history)))
        self._handed_out = self.probes
        self._replay = None
        self._estimator.load_state_dict(self, state.get("estimator", state))

    def __repr__(self) -> str:
        return (f"GeN({type(self.optimizer).__name__}, probe={self.probe!r}, every={self.every}, "
                f"smoothing={self.smoothing}, max_change={self.max_change}, horizon={self.horizon!r}, "
                f"lr={self.lr:.4g})")

    # ----------------------------------------------------------------- shared by the estimators
    def _all_params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _trainable(self) -> list[Tensor]:
        """The parameters this step moves: trainable and with a gradient."""
        return [p for p in self._all_params() if p.requires_grad and p.grad is not None]

    def _record(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        self.probes += 1
        self.accepted += bool(rec["accepted"])
        if self.history_size is not None and len(self.history) > self.history_size:
            del self.history[0]

    def _base_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.step()

    def _scale_lrs(self, r: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].mul_(r)
            else:
                group["lr"] = group["lr"] * r

    def _grad_scale(self) -> float:
        """What ``.grad`` is multiplied by now: the GradScaler's scale, unless the caller has already
        called ``scaler.unscale_(optimizer)`` this step (or the scaler has no ``get_scale``)."""
        get_scale = getattr(self.scaler, "get_scale", None)
        if get_scale is None:
            return 1.0
        stage = getattr(self.scaler, "_per_optimizer_states", {}).get(id(self.optimizer), {}).get("stage")
        return 1.0 if getattr(stage, "name", None) == "UNSCALED" else float(get_scale())

    def _reduce(self, stats: Tensor, summed: int) -> list[float]:
        """All-reduce if distributed (the first ``summed`` entries summed under sharding, the rest
        averaged), then the probe step's one host sync."""
        if distributed_active(self.distributed):
            stats = reduce_stats(stats, summed if self.sharded else 0)
        return stats.tolist()
