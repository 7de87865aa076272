"""Algorithm 2 (GeN-HOD): the curvature dᵀHd from a Hessian-vector product."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .probe import ProbeScope, as_loss


def curvature_along(
    closure: Callable[[], Any],
    params: Sequence[Tensor],
    deltas: Sequence[Tensor],
    scope: ProbeScope,
    model: nn.Module | None = None,
) -> tuple[Tensor, Tensor]:
    """``(L0, a)`` with ``a = δᵀ H δ`` at the current parameters (which must be ``w_t``).

    ``closure`` is called with grad enabled and must return a differentiable loss.
    ``g = ∂L/∂w`` is built with ``create_graph=True`` and ``Hδ = ∂(g·δ)/∂w`` by a
    second backward (``grad_outputs=δ``).  Parameters the loss does not reach, or
    whose gradient does not depend on the parameters (a linear loss), contribute 0.
    Under DDP the forward runs inside ``model.no_sync()`` so the reducer does not
    wait for a backward that never comes; the caller all-reduces ``a``.
    """
    sync_off = model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
    with torch.enable_grad(), sync_off:
        scope.before_call()
        loss = closure()
        grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
        pairs = [(g, d) for g, d in zip(grads, deltas) if g is not None and g.requires_grad]
        l0 = as_loss(loss)
        if not pairs:
            return l0, torch.zeros((), dtype=l0.dtype, device=l0.device)
        hd = torch.autograd.grad(
            [g for g, _ in pairs], list(params), grad_outputs=[d for _, d in pairs], allow_unused=True
        )
    scope.settle()  # the buffers' restore is queued before the caller's host sync
    terms = [torch.sum(h * d, dtype=torch.promote_types(d.dtype, torch.float32)).to(l0)
             for h, d in zip(hd, deltas) if h is not None]
    a = torch.stack(terms).sum() if terms else torch.zeros((), dtype=l0.dtype, device=l0.device)
    return l0, a.detach()
