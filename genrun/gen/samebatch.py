"""``GeN(probe="same")``: Algorithm 1 of the paper, probing the batch that made the step.

On a probe step (``t % Φ == 0``), after the base step: evaluate the training batch's loss at
``w_t - s·δ`` for ``s`` in ``points`` (line 5), fit ``ΔL(s) ≈ (a/2)s² - βs`` (lines 6-7,
:func:`~genrun.gen.fit.fit_parabola`; with ``slope=True`` β is the exact ``g·δ``), accept if
a > 0, β > 0 and R² ≥ ``min_r2`` (line 8), move the lr to ``γη + (1-γ)·h_t·η*`` within
``max_change`` (line 9), and rescale the step just taken so it already uses the new lr
(line 10).  ``guard`` adds the rules of :mod:`~genrun.gen.guard`.
``mode="exact"`` takes ``a = δᵀHδ`` from a Hessian-vector product (Algorithm 2);
``init_search`` replaces the first probe by the grid search of C.4.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .exact import curvature_along
from .fit import ParabolaFit, fit_parabola, horizon_factor, smoothed_ratio, why_rejected
from .guard import (
    GUARD_RULES,
    GUARD_TRIES,
    LOSS_ULPS,
    backtrack,
    backtrack_ratio,
    concave_ratio,
    filled_ratio,
    grown_ratio,
    guarded_ratio,
    kept_ratio,
    recovered_ratio,
    shrunk_ratio,
)
from .probe import ProbeScope, as_loss, probe_losses
from .search import momentum_echo, momentum_fill, search_ratio
from .snapshot import StepSnapshot

if TYPE_CHECKING:
    from .gen import GeN


class SameBatch:
    """The estimator behind ``GeN(probe="same")`` and :meth:`GeN.algorithm1`."""

    def __init__(self) -> None:
        self.search_done = False
        self.ceiling: float | None = None  # the lr before the guard's latest cut, until regained
        self.chosen: float | None = None   # the lr the latest accepted fit chose

    def step(self, gen: GeN, t: int, closure: Callable[[], Any], loss: Any, replay: dict[str, Any] | None) -> None:
        if t % gen.every != 0:
            gen._base_step()
            return
        snap = StepSnapshot(gen._trainable(), gen.snapshot)
        gen._base_step()
        snap.after_step()
        try:
            gen._record(self.probe(gen, t, closure, loss, snap, replay))
        finally:
            snap.release()

    def probe(self, gen: GeN, t: int, closure: Callable[[], Any], loss: Any, snap: StepSnapshot,
              replay: dict[str, Any] | None) -> dict[str, Any]:
        lr0 = gen.lr
        searching = gen.init_search and not self.search_done
        rec: dict[str, Any] = {
            "step": t, "mode": "init_search" if searching else gen.mode, "lr_before": lr0, "lr_after": lr0,
            "ratio": 1.0, "eta_star": None, "A": None, "b": None, "a_s": None, "beta_s": None, "r2": None,
            "accepted": False, "reason": None, "points": [], "losses": [],
            "horizon": horizon_factor(gen.horizon, t, gen.total_steps), "delta_norm": None,
            **dict.fromkeys(GUARD_RULES, False),  # one flag per guard rule: did it act on this probe
        }
        params = snap.params
        device = loss.device if isinstance(loss, Tensor) else (params[0].device if params else torch.device("cpu"))
        head = snap.slope_and_norm(device)  # [‖δ‖², β]
        if gen.scaler is not None or not params:  # a step GradScaler skipped has δ = 0: not probed
            if gen._reduce(head[:1], 1)[0] == 0.0:
                rec.update(reason="skipped_step", delta_norm=0.0)
                return rec
        r = 1.0
        try:
            with ProbeScope(gen.model, replay) as scope:
                if searching:
                    r, self.search_done = search_ratio(rec, closure, snap, scope, head, device, lr0, gen._reduce,
                                                       momentum_echo(gen.optimizer.param_groups))
                elif gen.mode == "exact":
                    r = self.exact(gen, rec, closure, snap, scope, head, lr0)
                else:
                    r = self.fit(gen, rec, closure, loss, snap, scope, head, device, lr0)
        finally:
            snap.place(r)  # w_t - r·δ; r = 1 (w_{t+1} bit-exactly) if anything failed
        kept = rec["accepted"] and not searching and "keep" in gen.rules
        lr_r = kept_ratio(r, gen.max_change) if kept else r
        rec["keep"] = lr_r != r
        if "fill" in gen.rules and not searching:  # the search already divides by momentum's echo
            filled = filled_ratio(lr_r, momentum_fill(gen.optimizer.param_groups, t + 1))
            lr_r, rec["fill"] = filled, filled != lr_r
        if lr_r != 1.0:
            gen._scale_lrs(lr_r)
        if rec["backtrack"] or rec["shrink"]:  # cuts after a rejected fit: r < 1
            # restore at most a rate a fit chose: not the caller's η0, nor one rule 4 grew to
            self.ceiling = None if self.chosen is None else min(lr0, self.chosen)
        elif self.ceiling is not None and gen.lr >= self.ceiling:
            self.ceiling = None
        if rec["accepted"]:
            self.chosen = gen.lr
        rec.update(ratio=r, lr_after=gen.lr)
        return rec

    def fit(self, gen: GeN, rec: dict[str, Any], closure: Callable[[], Any], loss: Any, snap: StepSnapshot,
            scope: ProbeScope, head: Tensor, device: torch.device, lr0: float) -> float:
        pts = list(gen.points)
        evals = [s for s in pts if not (s == 0.0 and loss is not None)]
        if loss is None and 0.0 not in pts:
            evals.append(0.0)
        vals = probe_losses(closure, snap.place, evals, scope, device)
        l0_t = as_loss(loss, device) if loss is not None else vals[evals.index(0.0)]
        host = gen._reduce(torch.stack([head[0], head[1], l0_t.to(head), *[v.to(head) for v in vals]]), 2)
        dd, beta, l0, probed = host[0], host[1], host[2], host[3:]
        losses = [l0 if (s == 0.0 and loss is not None) else probed[evals.index(s)] for s in pts]
        rec.update(points=pts, losses=losses, delta_norm=math.sqrt(max(dd, 0.0)))
        if dd == 0.0:
            rec["reason"] = "skipped_step"
            return 1.0
        fit = fit_parabola(pts, losses, l0, beta if gen.slope else None)
        finite = all(math.isfinite(x) for x in [l0, *losses]) and math.isfinite(beta)
        ref = loss if isinstance(loss, Tensor) and loss.is_floating_point() else snap.params[0]
        resolution = LOSS_ULPS * torch.finfo(ref.dtype).eps * abs(l0)  # the closure's rounding
        r = self.decide(gen, rec, fit, why_rejected(fit, finite, gen.min_r2), pts, losses, l0, lr0, resolution)
        if rec["backtrack"]:
            r, rec["guard_points"], rec["guard_losses"] = backtrack(
                closure, snap.place, scope, device, r, l0, fit.beta, lambda v: gen._reduce(v, 0)[0], GUARD_TRIES)
        return r

    def exact(self, gen: GeN, rec: dict[str, Any], closure: Callable[[], Any], snap: StepSnapshot,
              scope: ProbeScope, head: Tensor, lr0: float) -> float:
        snap.place(0.0)
        l0_t, a_t = curvature_along(closure, snap.params, snap.deltas(), scope, gen.model)
        dd, beta, a, l0 = gen._reduce(torch.stack([head[0], head[1], a_t.to(head), l0_t.to(head)]), 3)
        rec.update(losses=[l0], points=[0.0], delta_norm=math.sqrt(max(dd, 0.0)))
        if dd == 0.0:
            rec["reason"] = "skipped_step"
            return 1.0
        fit = ParabolaFit(a, beta, None, False)
        finite = math.isfinite(l0) and math.isfinite(beta) and math.isfinite(a)
        return self.decide(gen, rec, fit, why_rejected(fit, finite, None), [], [], l0, lr0)

    def decide(self, gen: GeN, rec: dict[str, Any], fit: ParabolaFit, reason: str | None, pts: list[float],
               losses: list[float], l0: float, lr0: float, resolution: float = 0.0) -> float:
        """Record the fit; this step's multiplier r: line 9 if accepted, else 1, unless the guard acts."""
        eta = lr0 if lr0 != 0 else math.nan
        rec.update(a_s=fit.a, beta_s=fit.beta, r2=fit.r2, A=fit.a / eta**2, b=fit.beta / eta,
                   eta_star=lr0 * fit.s_star, reason=reason, accepted=reason is None)
        on = gen.rules
        if reason is not None:
            if reason == "skipped_step":
                return 1.0
            r = 1.0
            if "grow" in on:
                r, rec["grow"] = grown_ratio(fit, reason, pts, resolution, gen.max_change)
            if "backtrack" in on and not rec["grow"]:
                r, rec["backtrack"] = backtrack_ratio(1.0, pts, losses, l0, fit.beta)
            if "concave" in on and not (rec["grow"] or rec["backtrack"]):
                r, rec["concave"] = concave_ratio(fit, reason, gen.smoothing, rec["horizon"], gen.max_change,
                                                  gen.min_r2)
            if "shrink" in on and not (rec["grow"] or rec["backtrack"] or rec["concave"]):  # only an R² failure
                r, rec["shrink"] = shrunk_ratio(fit, reason, gen.max_change)
            return r
        r = smoothed_ratio(fit.s_star, gen.smoothing, rec["horizon"], gen.max_change)
        if "recover" in on and self.ceiling is not None and lr0 > 0.0:
            raised = recovered_ratio(r, fit.s_star, rec["horizon"], gen.max_change, self.ceiling / lr0)
            r, rec["recover"] = raised, raised > r
        if "cap" in on:
            r, rec["cap"] = guarded_ratio(r, fit, pts, losses, l0)
        return r

    def state_dict(self, gen: GeN) -> dict[str, Any]:
        return {"search_done": self.search_done, "ceiling": self.ceiling, "chosen": self.chosen}

    def load_state_dict(self, gen: GeN, state: dict[str, Any]) -> None:
        self.search_done = bool(state.get("search_done", False))
        self.ceiling, self.chosen = state.get("ceiling"), state.get("chosen")
