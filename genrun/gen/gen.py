"""``GeN``: the Generalized Newton step size (Bu & Xu, ICLR 2025) around any optimizer."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .distributed import distributed_active, reduce_stats
from .exact import curvature_along
from .fit import (
    LOSS_ULPS, ParabolaFit, backtrack_ratio, fit_parabola, grown_ratio, guarded_ratio, horizon_factor, kept_ratio,
    recovered_ratio, shrunk_ratio, smoothed_ratio, why_rejected,
)
from .probe import ProbeScope, as_loss, backtrack, probe_losses, rng_state
from .search import momentum_echo, search_ratio
from .snapshot import StepSnapshot
from .validate import check_arguments

Closure = Callable[[], Any]

#: Most extra probe forwards the guard spends on one step after a rejected fit.
GUARD_TRIES = 8


class GeN:
    """Keeps setting the learning rate of ``optimizer`` to ``η* = Gᵀd / dᵀHd`` as it trains.

    d is the base optimizer's update per unit lr, G and H the gradient and Hessian
    of the closure's loss: η* minimises the local quadratic model along d (3.1).

    Wraps any optimizer whose update is ``w -= lr·u(state, grad)`` (SGD with
    momentum/Nesterov/weight decay, Adam, AdamW, Adagrad, RMSprop, ...).  Per call of
    :meth:`step` (t = 0, 1, ...), the base step is taken exactly once.  When
    ``t % every == 0`` (Algorithm 1 line 4) it also:

    1. keeps ``w_t`` and ``w_{t+1}``; ``δ = w_t - w_{t+1} = η·d`` (d includes weight decay);
    2. evaluates ``closure()`` under no_grad at ``w_t - s·δ`` for ``s`` in ``points``
       (``s = 0`` uses ``loss`` when given) — line 5;
    3. fits ``L(s) - L0 ≈ (a/2)s² - βs`` (:func:`~genrun.gen.fit.fit_parabola`); with
       ``slope=True`` β is exact, ``β = Σ grad·δ`` from ``.grad``, so only ``a`` is fitted
       and R² has a residual to measure even with three points — lines 6-7;
    4. accepts if a > 0, β > 0, all finite, fit not degenerate and R² ≥ ``min_r2`` — line 8;
    5. ``η_new = γη + (1-γ)·η*·h_t`` (h_t the horizon factor of (C.1)), clamped to
       ``[η/max_change, η·max_change]``; every group's lr is multiplied by
       ``r = η_new/η`` so ratios between groups survive — line 9;
    6. ``w_{t+1} = w_t - r·δ``: this very step already uses the new rate — line 10;
    7. with ``guard=True``, steps at a rate the probes show to raise the loss are not
       taken: for an accepted fit, after the clamp, r is capped at the fitted minimiser
       ``β/a`` when the parabola or a probe at ``0 < s ≤ r`` says r raises the loss
       (:func:`~genrun.gen.fit.guarded_ratio`); for a *rejected* fit (kept rate, r = 1)
       with a probe at ``0 < s ≤ 1`` above L0, a safeguarded backtracking line search
       (:func:`~genrun.gen.fit.backtrack_ratio`, quadratic interpolation from L0, the
       exact slope β and the failed trial) cuts r and re-probes until the step no longer
       raises the loss — at most ``GUARD_TRIES`` extra forwards, spent only then; for a
       fit the R² gate alone rejected, whose parabola still has its minimiser inside the
       step (0 < β/a < 1), r = β/a, bounded below by ``1/max_change``
       (:func:`~genrun.gen.fit.shrunk_ratio`).  Before these: a rejected fit whose
       curvature is within the loss's rounding (a step far too short to feel it) gets
       r = ``max_change`` (:func:`~genrun.gen.fit.grown_ratio`).  The lr follows r,
       except that after an accepted fit's cap it falls by at most ``1/max_change``
       while staying at most 2·s* (:func:`~genrun.gen.fit.kept_ratio`).  After a
       backtrack or a shrink cut the lr, an accepted fit may take it straight back up to
       min(s*·h, ``max_change``) per probe, until it regains the rate before that cut, or
       the latest accepted fit's rate if lower (:func:`~genrun.gen.fit.recovered_ratio`).
       Without the guard, Algorithm 1 with γ = 0.9 diverges on Beale from (1, 1.5) and GeN-SGD
       from lr 0.05 on Rosenbrock/Beale (``tests/test_synthetic_guard.py``).

    ``history`` gets one plain-Python record per probe step: step, lr_before,
    lr_after, ratio (this step's multiplier r), eta_star, A = a/η², b = β/η, a_s, beta_s, r2, accepted, reason
    (None or one of "nonfinite", "degenerate", "curvature<=0", "slope<=0", "r2",
    "skipped_step", "init_search"), points, losses, horizon, guarded, shrunk, grown, recovered, delta_norm; after a
    guard backtrack also guard_points and guard_losses (the re-probed multipliers and losses).
    ``history_size`` keeps only that many latest records (None: all; a long run makes
    250k records per million steps at Φ = 4, and ``state_dict`` carries them); ``probes``
    and ``accepted`` count every record ever made.
    GeN owns the lr: an LR scheduler stepping the same optimizer would fight it
    (use ``horizon`` for a T-dependent decay).

    ``mode="exact"`` (Algorithm 2) takes ``a = δᵀHδ`` from a Hessian-vector product at
    ``w_t`` instead of probes (``closure`` must then return a differentiable loss, no R²).
    ``init_search`` replaces the first probe by the grid search of C.4.2 (the lowest
    probe loss, divided by heavy-ball momentum's 1/(1 - μ)).  Non-probe
    steps cost nothing: no copies, no syncs.  A probe step syncs once (with
    ``scaler``, once more: the zero-step check, right after GradScaler's own sync);
    rejected probes never raise.  Speed and memory on a GPU: README (``make bench``).

    The closure must evaluate the batch that produced ``.grad``: ``slope=True`` takes
    β from that gradient and ``loss`` is L0 on that batch.  To probe an independent
    batch, pass ``slope=False`` and ``loss=None``.  Put autocast *inside* the closure,
    as for the training forward.  With gradient accumulation the closure returns the
    same mean the accumulated ``.grad`` differentiates.  Gradient clipping rescales
    ``.grad`` in place, so with ``slope=True`` β (and η*) shrinks by the clip factor.

    ``model``: its buffers are restored after the probes (BatchNorm statistics move
    only in the training forward); training mode is kept so probes evaluate the
    training function.  :meth:`remember_rng` right before the training forward makes
    every probe replay the forward's dropout masks; the RNG stream after ``step`` is
    the same as without probing either way.  ``scaler``: a GradScaler; ``step`` calls
    ``scaler.step(optimizer)`` (the caller still calls ``scaler.update()``), and a step
    the scaler skips (δ = 0) is not probed and leaves the lr alone.

    Distributed (``distributed="auto"``: on when a process group is initialised): L0,
    the probe losses, β and ‖δ‖² travel in one all-reduce, so all ranks pick the same
    lr and DDP replicas stay bit-identical.  The closure is called the same number
    of times on every rank (DDP buffer broadcasts and SyncBatchNorm are collectives).
    Under parameter sharding (FSDP with flat sharded parameters) each rank's δ and
    ``.grad`` are shards, so ``Σ grad·δ``, ``‖δ‖²`` and ``δᵀHδ`` are partial sums that
    must be SUM-reduced, not averaged: pass ``sharded=True`` (losses are still
    averaged).  Untested: FSDP2/DTensor parameters (a DTensor sum may already
    all-reduce, then leave ``sharded=False``) and hybrid sharding (would need a
    process group per replica).  ``mode="exact"`` under DDP runs the HVP forward in
    ``model.no_sync()`` when ``model`` is the DDP module.

    Memory: a probe step holds two copies of the trainable parameters (``w_t`` and
    ``w_{t+1}``, see :class:`~genrun.gen.snapshot.StepSnapshot`); ``snapshot="cpu"``
    keeps them in host memory, so peak device memory stays the base optimizer's.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        every: int = 4,
        smoothing: float = 0.9,
        points: Sequence[float] = (-1.0, 0.0, 1.0),
        min_r2: float | None = 0.99,
        max_change: float | None = 2.0,
        slope: bool = True,
        mode: str = "fit",
        horizon: str | None = None,
        total_steps: int | None = None,
        init_search: bool = False,
        snapshot: str = "device",
        model: nn.Module | None = None,
        scaler: Any = None,
        guard: bool = False,
        distributed: bool | str = "auto",
        sharded: bool = False,
        history_size: int | None = None,
    ) -> None:
        self.points = check_arguments(
            optimizer, every=every, smoothing=smoothing, points=points, min_r2=min_r2,
            max_change=max_change, slope=slope, mode=mode, horizon=horizon,
            total_steps=total_steps, init_search=init_search, snapshot=snapshot, model=model,
            scaler=scaler, guard=guard, distributed=distributed, sharded=sharded,
            history_size=history_size,
        )
        self.optimizer = optimizer
        self.every, self.smoothing, self.min_r2, self.max_change = every, smoothing, min_r2, max_change
        self.slope, self.mode, self.horizon, self.total_steps = slope, mode, horizon, total_steps
        self.init_search, self.snapshot, self.model, self.scaler = init_search, snapshot, model, scaler
        self.guard, self.distributed, self.sharded = guard, distributed, sharded
        self.history: list[dict[str, Any]] = []
        self.history_size = history_size
        self.probes = 0    # probe records ever made (history may keep only the last ones)
        self.accepted = 0  # of which accepted
        self._step = 0
        self._search_done = False
        self._replay: tuple[int, dict[str, Any]] | None = None
        self._ceiling: float | None = None  # the lr before the guard's latest cut, until regained
        self._chosen: float | None = None   # the lr the latest accepted fit chose

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
        """Call right before the training forward: probes of this step replay its RNG.

        Free on steps that will not probe.
        """
        if self.will_probe:
            self._replay = (self._step, rng_state())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Closure, loss: Tensor | float | None = None) -> None:
        """One training step: the base step, plus a probe and lr update every ``every`` calls.

        ``closure()`` returns the loss on the training batch at the current weights
        (called only on probe steps, under no_grad except in exact mode).  ``loss`` is
        L0, that batch's loss at ``w_t`` (e.g. ``loss.detach()``, unscaled); it saves a
        forward.
        """
        t = self._step
        replay = self._replay[1] if self._replay is not None and self._replay[0] == t else None
        self._replay = None
        try:
            if t % self.every != 0:
                self._base_step()
                return
            params = [p for g in self.optimizer.param_groups for p in g["params"]
                      if p.requires_grad and p.grad is not None]
            snap = StepSnapshot(params, self.snapshot)
            self._base_step()
            snap.after_step()
            try:
                self._record(self._probe(t, closure, loss, snap, replay))
            finally:
                snap.release()
        finally:
            self._step = t + 1

    def state_dict(self) -> dict[str, Any]:
        """GeN's own state (the lr itself lives in the optimizer's state_dict)."""
        return {"step": self._step, "search_done": self._search_done, "history": copy.deepcopy(self.history),
                "probes": self.probes, "accepted": self.accepted, "ceiling": self._ceiling, "chosen": self._chosen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"step", "search_done", "history"} - set(state)
        if missing:
            raise KeyError(f"GeN state_dict lacks {sorted(missing)}")
        self._step = int(state["step"])
        self._search_done = bool(state["search_done"])
        self.history = copy.deepcopy(list(state["history"]))
        # states saved before the counters existed held every record
        self.probes = int(state.get("probes", len(self.history)))
        self.accepted = int(state.get("accepted", sum(bool(r.get("accepted")) for r in self.history)))
        self._replay = None
        self._ceiling, self._chosen = state.get("ceiling"), state.get("chosen")

    def __repr__(self) -> str:
        return (f"GeN({type(self.optimizer).__name__}, every={self.every}, smoothing={self.smoothing}, "
                f"points={self.points}, min_r2={self.min_r2}, max_change={self.max_change}, "
                f"slope={self.slope}, mode={self.mode!r}, lr={self.lr:.4g})")

    # ----------------------------------------------------------------- internals
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

    def _reduce(self, stats: Tensor, summed: int) -> list[float]:
        """All-reduce if distributed, then the probe step's one host sync."""
        if distributed_active(self.distributed):
            stats = reduce_stats(stats, summed if self.sharded else 0)
        return stats.tolist()

    def _probe(self, t: int, closure: Closure, loss: Any, snap: StepSnapshot,
               replay: dict[str, Any] | None) -> dict[str, Any]:
        lr0 = self.lr
        searching = self.init_search and not self._search_done
        rec: dict[str, Any] = {
            "step": t, "mode": "init_search" if searching else self.mode, "lr_before": lr0,
            "lr_after": lr0, "ratio": 1.0, "eta_star": None, "A": None, "b": None, "a_s": None,
            "beta_s": None, "r2": None, "accepted": False, "reason": None, "points": [], "losses": [],
            "horizon": horizon_factor(self.horizon, t, self.total_steps), "guarded": False, "shrunk": False,
            "grown": False, "recovered": False, "delta_norm": None,
        }
        params = snap.params
        device = loss.device if isinstance(loss, Tensor) else (params[0].device if params else torch.device("cpu"))
        head = snap.slope_and_norm(device)  # [‖δ‖², β]
        if self.scaler is not None or not params:
            # GradScaler just synced to decide; a skipped step has δ = 0 and is not probed
            dd = self._reduce(head[:1], 1)[0] if self.sharded else head[0].item()
            if dd == 0.0:
                rec.update(reason="skipped_step", delta_norm=0.0)
                return rec
        r = 1.0
        try:
            with ProbeScope(self.model, replay) as scope:
                if searching:
                    r, self._search_done = search_ratio(rec, closure, snap, scope, head, device, lr0, self._reduce,
                                                        momentum_echo(self.optimizer.param_groups))
                elif self.mode == "exact":
                    r = self._exact(rec, closure, snap, scope, head, lr0)
                else:
                    r = self._fit(rec, closure, loss, snap, scope, head, device, lr0)
        finally:
            snap.place(r)  # w_t - r·δ; r = 1 (w_{t+1} bit-exactly) if anything failed
        lr_r = kept_ratio(r, self.max_change) if rec["accepted"] and not searching else r
        if lr_r != 1.0:
            self._scale_lrs(lr_r)
        if (rec["guarded"] or rec["shrunk"]) and not rec["accepted"]:  # a backtrack or a shrink: r < 1
            # restore at most a rate a fit chose: not the caller's η0, nor one rule 4 grew to
            self._ceiling = None if self._chosen is None else min(lr0, self._chosen)
        elif self._ceiling is not None and self.lr >= self._ceiling:
            self._ceiling = None
        if rec["accepted"]:
            self._chosen = self.lr
        rec.update(ratio=r, lr_after=self.lr)
        return rec

    def _fit(self, rec: dict[str, Any], closure: Closure, loss: Any, snap: StepSnapshot,
             scope: ProbeScope, head: Tensor, device: torch.device, lr0: float) -> float:
        pts = list(self.points)
        evals = [s for s in pts if not (s == 0.0 and loss is not None)]
        if loss is None and 0.0 not in pts:
            evals.append(0.0)
        vals = probe_losses(closure, snap.place, evals, scope, device)
        l0_t = as_loss(loss, device) if loss is not None else vals[evals.index(0.0)]
        host = self._reduce(torch.stack([head[0], head[1], l0_t.to(head), *[v.to(head) for v in vals]]), 2)
        dd, beta, l0, probed = host[0], host[1], host[2], host[3:]
        losses = [l0 if (s == 0.0 and loss is not None) else probed[evals.index(s)] for s in pts]
        rec.update(points=pts, losses=losses, delta_norm=math.sqrt(max(dd, 0.0)))
        if dd == 0.0:
            rec["reason"] = "skipped_step"
            return 1.0
        fit = fit_parabola(pts, losses, l0, beta if self.slope else None)
        finite = all(math.isfinite(x) for x in [l0, *losses]) and math.isfinite(beta)
        ref = loss if isinstance(loss, Tensor) and loss.is_floating_point() else snap.params[0]
        resolution = LOSS_ULPS * torch.finfo(ref.dtype).eps * abs(l0)  # the closure's rounding
        r = self._decide(rec, fit, why_rejected(fit, finite, self.min_r2), pts, losses, l0, lr0, resolution)
        if rec["guarded"] and not rec["accepted"]:
            r, rec["guard_points"], rec["guard_losses"] = backtrack(
                closure, snap.place, scope, device, r, l0, fit.beta, lambda v: self._reduce(v, 0)[0], GUARD_TRIES)
        return r

    def _exact(self, rec: dict[str, Any], closure: Closure, snap: StepSnapshot,
               scope: ProbeScope, head: Tensor, lr0: float) -> float:
        snap.place(0.0)
        l0_t, a_t = curvature_along(closure, snap.params, snap.deltas(), scope, self.model)
        host = self._reduce(torch.stack([head[0], head[1], a_t.to(head), l0_t.to(head)]), 3)
        dd, beta, a, l0 = host
        rec.update(losses=[l0], points=[0.0], delta_norm=math.sqrt(max(dd, 0.0)))
        if dd == 0.0:
            rec["reason"] = "skipped_step"
            return 1.0
        fit = ParabolaFit(a, beta, None, False)
        finite = math.isfinite(l0) and math.isfinite(beta) and math.isfinite(a)
        return self._decide(rec, fit, why_rejected(fit, finite, None), [], [], l0, lr0)

    def _decide(self, rec: dict[str, Any], fit: ParabolaFit, reason: str | None,
                pts: list[float], losses: list[float], l0: float, lr0: float, resolution: float = 0.0) -> float:
        """Record the fit; return this step's ratio r (1 when rejected, unless the guard acts)."""
        eta = lr0 if lr0 != 0 else math.nan
        rec.update(
            a_s=fit.a, beta_s=fit.beta, r2=fit.r2, A=fit.a / eta**2, b=fit.beta / eta,
            eta_star=lr0 * fit.s_star, reason=reason, accepted=reason is None,
        )
        if reason is not None:
            if not self.guard or reason == "skipped_step":
                return 1.0
            r, rec["grown"] = grown_ratio(fit, reason, pts, resolution, self.max_change)
            if not rec["grown"]:
                r, rec["guarded"] = backtrack_ratio(1.0, pts, losses, l0, fit.beta)
            if not (rec["grown"] or rec["guarded"]):
                r, rec["shrunk"] = shrunk_ratio(fit, reason, self.max_change)
            return r
        r = smoothed_ratio(fit.s_star, self.smoothing, rec["horizon"], self.max_change)
        if self.guard:
            if self._ceiling is not None and lr0 > 0.0:
                raised = recovered_ratio(r, fit.s_star, rec["horizon"], self.max_change, self._ceiling / lr0)
                r, rec["recovered"] = raised, raised > r
            r, rec["guarded"] = guarded_ratio(r, fit, pts, losses, l0)
        return r
