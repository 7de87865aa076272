"""``GeN(probe="next")``: curvature from the step's own batch, slope from the next batch.

Notation as in :mod:`~genrun.gen.fit`: a probe step ``δ = w_t - w_{t+1}`` (taken at lr η) and,
along it, ``ΔL(s) = L(w_t - s·δ) - L(w_t) ≈ (a/2)·s² - β·s`` with ``a = δᵀHδ``, ``β = Gᵀδ``;
``η* = η·β/a`` (3.1).

* Curvature, at once.  One no-grad forward at ``w_{t+1}`` on the training batch B gives
  ``a/2 = L_B(1) - L_B(0) + β_B``: L_B(0) is the training loss and ``β_B = g_Bᵀδ`` comes from
  the gradient the step used.  A step that raised B's own loss (``L_B(1) > L_B(0)``) is too
  long beyond doubt (B's loss falls faster along its own step than any other batch's): it is
  cut on the spot to B's parabola minimum ``β_B/a``, and the lr with it.
* Slope, one call later.  ``β_B`` over-estimates ``Gᵀδ``: δ leans on B's own noise, by a
  factor of about ``1 + B_noise/B`` (the gradient noise scale over the batch size), which
  grows as the signal fades (a plateau, near-zero loss).  The next call's batch B' had no part
  in δ, and its gradient at ``w_{t+1}`` gives the slope at the end of the step for free,
  ``S' = -g'ᵀδ``; with the curvature, the slope at the start is ``β' = a - S'``, unbiased.
* Averages.  One batch's slope and curvature are noisy, their ratio worse; like MoMo, SaLSa
  and LABPAL we average the ingredients, per unit of the step (``b̂ = η·β/‖δ‖²``,
  ``Â = a/‖δ‖²``), and take ratios of the averages.
* The rate.  ``min(η*_B, (1+μ)·η*')``: B's own Newton step (its noise-inflated slope makes it
  longer than the one-step optimum, which is short-sighted over a run: Wu et al. 2018), but
  never past the held-out optimum, stretched by heavy ball's ``1 + μ`` where the base
  optimizer has momentum μ (:func:`heavy_ball_reach`).  Without noise both are η*.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .fit import horizon_factor
from .probe import ProbeScope, as_loss, probe_losses
from .snapshot import StepSnapshot, accumulation_dtype

if TYPE_CHECKING:
    from .gen import GeN

#: Rounding resolution of a probe loss, in units of its dtype's eps times |L0|.  Measured on the
#: offline tasks (float32 cross-entropy): at steps far too short to feel curvature the second
#: difference of the loss is at most ~6 eps·L0, random in sign; real curvature is hundreds.
LOSS_ULPS = 16.0


@dataclass(frozen=True)
class OwnBatch:
    """What the probe forward on the step's own batch B says, in units of the step δ."""

    l0: float          # L_B(w_t), the training loss
    l1: float          # L_B(w_{t+1})
    beta: float        # β_B = g_Bᵀδ
    dd: float          # ‖δ‖²
    resolution: float  # the loss's rounding

    @property
    def a(self) -> float:
        return 2.0 * (self.l1 - self.l0 + self.beta)

    @property
    def resolved(self) -> bool:
        """Whether ``a/2`` (the curvature term at s = 1) stands above the loss's rounding."""
        return 0.5 * abs(self.a) > self.resolution

    def cut(self) -> float:
        """The step's multiplier: B's parabola minimum ``β_B/a`` (below 1/2) when the step raised
        B's loss by more than its rounding, a tenth when the probe is not finite, else 1."""
        if not math.isfinite(self.l1):
            return 0.1
        if self.l1 - self.l0 > self.resolution and self.beta > 0.0 and self.a > 0.0:
            return self.beta / self.a
        return 1.0


class HeldStep:
    """A probe step kept until the next call: ``δ`` (one copy of the trainable parameters), the lr
    that took it, and its own batch's curvature ``a``, slope ``β_B`` and ``‖δ‖²``, all of the step
    as taken (after a cut ``r``: ``r²a``, ``r·β_B``, ``r²‖δ‖²``)."""

    def __init__(self, params: Sequence[Tensor], deltas: Sequence[Tensor], lr: float, a: float, beta: float,
                 dd: float, resolved: bool, record: dict[str, Any]) -> None:
        self.params, self.deltas, self.record = list(params), list(deltas), record
        self.lr, self.a, self.beta, self.dd, self.resolved = lr, a, beta, dd, resolved

    def slope(self, device: torch.device) -> Tensor:
        """``Σ grad·δ`` with the gradients there now (float64 on ``device``, no host sync)."""
        parts = []
        with torch.no_grad():
            for d, p in zip(self.deltas, self.params):
                g = p.grad
                dev = d if d.device == g.device else d.to(g.device, non_blocking=True)
                parts.append(torch.sum(g * dev, dtype=accumulation_dtype(d.dtype)).to(device, torch.float64))
        return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=device)

    def state(self, index: dict[int, int]) -> dict[str, Any]:
        return {"index": [index[id(p)] for p in self.params], "deltas": [d.detach().cpu().clone() for d in self.deltas],
                "numbers": [self.lr, self.a, self.beta, self.dd, self.resolved], "record": dict(self.record)}

    @classmethod
    def restore(cls, state: dict[str, Any], params: Sequence[Tensor]) -> HeldStep:
        mine = [params[i] for i in state["index"]]
        deltas = [d.to(p.device, p.dtype) for d, p in zip(state["deltas"], mine)]
        lr, a, beta, dd, resolved = state["numbers"]
        return cls(mine, deltas, float(lr), float(a), float(beta), float(dd), bool(resolved), dict(state["record"]))


@dataclass
class Averages:
    """Exponential averages (decay ρ) of ``b̂ = η·β'/‖δ‖²`` (held-out slope), ``b̂_B = η·β_B/‖δ‖²``
    (the own batch's) and ``Â = a/‖δ‖²``.  Their ratios need no bias correction (all share ``1 - ρᵏ``)."""

    b: float = 0.0
    b_own: float = 0.0
    A: float = 0.0
    count: int = 0

    def add(self, b: float, b_own: float, A: float, rho: float) -> None:
        self.b = rho * self.b + (1.0 - rho) * b
        self.b_own = rho * self.b_own + (1.0 - rho) * b_own
        self.A = rho * self.A + (1.0 - rho) * A
        self.count += 1

    def eta(self, reach: float = 1.0) -> float:
        """``min(η*_B, reach·η*')`` with ``η*_B = b̂̄_B/Â̄``, ``η*' = b̂̄/Â̄`` (nan before any measurement)."""
        if not self.count or self.A == 0.0:
            return math.nan
        return min(self.b_own, reach * self.b) / self.A


def heavy_ball_reach(param_groups: Sequence[dict[str, Any]]) -> float:
    """``1 + μ`` for heavy-ball momentum μ (SGD's and RMSprop's ``momentum``), else 1.

    On a quadratic, gradient descent is stable for ``η·h < 2`` and heavy ball for
    ``η·h < 2(1 + μ)`` (Polyak 1964): along the same curvature, heavy ball's steps may be
    ``1 + μ`` times longer.  Adam's β1 and Lion's β averages rather than accumulates: 1.
    """
    mu = max((float(g.get("momentum", 0.0) or 0.0) for g in param_groups), default=0.0)
    return 1.0 + mu if 0.0 < mu < 1.0 else 1.0


def decide(avg: Averages, lr: float, reach: float, horizon: float, max_change: float | None,
           resolved: bool, descends: bool) -> tuple[float, str | None]:
    """The lr after one measurement, and why (None: accepted), walking the rules in order.

    1. ``unresolved``: the step's curvature is within the loss's rounding, the step too short to
       feel it: grow by ``max_change`` if it descends on its own batch (β_B > 0), else hold.
    2. ``no_descent``: the averaged held-out slope ``b̂̄ ≤ 0``: to first order the steps do not
       lower the loss of data that did not make them, whatever their length: hold.
    3. ``concave``: ``Â̄ ≤ 0``: no minimum along the steps to aim at: hold.
    4. accepted: ``h_t·min(η*_B, reach·η*')`` (h_t the horizon factor, ``reach`` heavy ball's
       ``1 + μ``), within ``[lr/max_change, lr·max_change]``.
    """
    if not resolved:
        return lr * (max_change if max_change is not None and descends else 1.0), "unresolved"
    if not avg.b > 0.0:
        return lr, "no_descent"
    if not avg.A > 0.0:
        return lr, "concave"
    target = horizon * avg.eta(reach)
    if max_change is not None:
        target = min(max(target, lr / max_change), lr * max_change)
    return target, None


class NextBatch:
    """The estimator behind ``GeN(probe="next")``: probe, keep the step, measure it one call later."""

    def __init__(self) -> None:
        self.avg = Averages()
        self.held: HeldStep | None = None

    def step(self, gen: GeN, t: int, closure: Callable[[], Any], loss: Any, replay: dict[str, Any] | None) -> None:
        held, self.held = self.held, None
        if held is not None:  # the last probe step's slope on this call's batch sets this step's lr
            gen._record(self.measure(gen, held))
        if t % gen.every != 0:
            gen._base_step()
            return
        snap = StepSnapshot(gen._trainable(), gen.snapshot)
        lr = gen.lr
        gen._base_step()
        snap.after_step()
        r, own = 1.0, None
        try:
            own = self.probe(gen, closure, loss, snap, replay)
            r = own.cut() if own is not None else 1.0
        finally:
            snap.place(r)  # w_t - r·δ: w_{t+1} bit-exactly unless the step raised its own batch's loss
        if own is None:
            snap.release()
            return
        if r != 1.0:
            gen._scale_lrs(r)
        record = {"step": t, "lr_before": lr, "cut": r, "l0": own.l0, "l1": own.l1,
                  "horizon": horizon_factor(gen.horizon, t, gen.total_steps)}
        self.held = HeldStep(snap.params, snap.keep_delta(), lr * r, r * r * own.a, r * own.beta, r * r * own.dd,
                             own.resolved, record)

    def probe(self, gen: GeN, closure: Callable[[], Any], loss: Any, snap: StepSnapshot,
              replay: dict[str, Any] | None) -> OwnBatch | None:
        """L_B(1) on the step's own batch (one forward), with L0 and β_B; None for a step not taken."""
        params = snap.params
        device = loss.device if isinstance(loss, Tensor) else (params[0].device if params else torch.device("cpu"))
        head = snap.slope_and_norm(device)  # [‖δ‖², β_B]
        if gen.scaler is not None or not params:  # a step GradScaler skipped has δ = 0: no forward for it
            if gen._reduce(head[:1], 1)[0] == 0.0:
                return None
        evals = [1.0] if loss is not None else [1.0, 0.0]
        with ProbeScope(gen.model, replay) as scope:
            vals = probe_losses(closure, snap.place, evals, scope, device)
        l0_t = as_loss(loss, device) if loss is not None else vals[1]
        dd, beta, l0, l1 = gen._reduce(torch.stack([head[0], head[1], l0_t.to(head), vals[0].to(head)]), 2)
        if dd == 0.0 or not (math.isfinite(l0) and math.isfinite(beta)):
            return None
        ref = loss if isinstance(loss, Tensor) and loss.is_floating_point() else params[0]
        return OwnBatch(l0, l1, beta, dd, LOSS_ULPS * torch.finfo(ref.dtype).eps * abs(l0))

    def measure(self, gen: GeN, held: HeldStep) -> dict[str, Any]:
        """Fold the held step's held-out slope into the averages and set the lr; the probe's record."""
        lr0, eta, a = gen.lr, held.lr, held.a
        rec = {**held.record, "lr_after": lr0, "ratio": 1.0, "a_s": a, "beta_own": held.beta, "beta_s": None,
               "eta_star": None, "eta_own": None, "eta_avg": None, "A": None, "b": None, "resolved": held.resolved,
               "accepted": False, "reason": None, "delta_norm": math.sqrt(held.dd)}
        if any(p.grad is None for p in held.params):
            rec["reason"] = "skipped_step"
            return rec
        device = held.params[0].device if held.params else torch.device("cpu")
        gdot = gen._reduce(held.slope(device).reshape(1), 1)[0] / gen._grad_scale()
        beta = a + gdot  # β' = a - S' with S' = -g'ᵀδ, the next batch's slope at the end of the step
        if not math.isfinite(beta):
            rec["reason"] = "nonfinite"
            return rec
        if held.resolved:
            self.avg.add(eta * beta / held.dd, eta * held.beta / held.dd, a / held.dd, gen.smoothing)
        reach = heavy_ball_reach(gen.optimizer.param_groups)
        new, reason = decide(self.avg, lr0, reach, rec["horizon"], gen.max_change, held.resolved, held.beta > 0.0)
        if new != lr0 and lr0 > 0.0:
            gen._scale_lrs(new / lr0)
        rec.update(beta_s=beta, A=a / eta**2, b=beta / eta, eta_avg=self.avg.eta(reach), reason=reason,
                   accepted=reason is None, ratio=gen.lr / lr0 if lr0 else 1.0, lr_after=gen.lr,
                   eta_star=eta * beta / a if a else None, eta_own=eta * held.beta / a if a else None)
        return rec

    def state_dict(self, gen: GeN) -> dict[str, Any]:
        index = {id(p): i for i, p in enumerate(gen._all_params())}
        return {"averages": [self.avg.b, self.avg.b_own, self.avg.A, self.avg.count],
                "held": self.held.state(index) if self.held is not None else None}

    def load_state_dict(self, gen: GeN, state: dict[str, Any]) -> None:
        b, b_own, A, count = state.get("averages", (0.0, 0.0, 0.0, 0))
        self.avg = Averages(float(b), float(b_own), float(A), int(count))
        held = state.get("held")
        self.held = HeldStep.restore(held, gen._all_params()) if held is not None else None
