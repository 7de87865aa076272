"""The GeN training call the GeN tests make, in one place: forward, backward, ``gen.step``, clear.

Plain torch, no pytest: ``python tests/test_gen_cuda.py`` imports it on a GPU machine without pytest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

F64 = torch.float64


def gen_call(gen, closure: Callable[[], torch.Tensor], *, loss: bool = True, scaler=None, finite_only: bool = False,
             before_step: Callable[[], object] | None = None,
             after_step: Callable[[], object] | None = None) -> torch.Tensor:
    """One training call as a training loop makes it; returns the call's loss, detached.

    ``loss=False`` leaves GeN to run the s = 0 forward itself (``gen.step(closure, loss=None)``).
    With a ``scaler`` the backward is of the scaled loss and the scaler is updated after the step.
    ``finite_only``: a non-finite loss ends the call before the backward (a diverged run: no step).
    ``before_step`` sees the gradients before the step; ``after_step`` sees them after it, before
    they are cleared."""
    out = closure()
    if finite_only and not torch.isfinite(out):
        return out.detach()
    (scaler.scale(out) if scaler is not None else out).backward()
    if before_step is not None:
        before_step()
    gen.step(closure, loss=out.detach() if loss else None)
    if after_step is not None:
        after_step()
    if scaler is not None:
        scaler.update()
    gen.zero_grad()
    return out.detach()


def gen_train(gen, closure: Callable[[], torch.Tensor], calls: int, **kwargs) -> list[torch.Tensor]:
    """``calls`` training calls on the same closure (see :func:`gen_call`); their losses."""
    return [gen_call(gen, closure, **kwargs) for _ in range(calls)]


def mse(model, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Closure: the mean squared error of a one-output ``model`` on ``(x, y)``."""
    return lambda: ((model(x).squeeze(1) - y) ** 2).mean()


def quadratic(n: int = 6, seed: int = 0, scale: float = 1.0):
    """(H, c, w0) of L(w) = ½wᵀHw - cᵀw in float64: H symmetric positive definite, w0 a leaf."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=F64)
    h = m @ m.T / n + 0.5 * torch.eye(n, dtype=F64)
    c = torch.randn(n, generator=g, dtype=F64)
    w = torch.randn(n, generator=g, dtype=F64).requires_grad_()
    return scale * h, scale * c, w


def loss_of(h: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Closure: ½wᵀHw - cᵀw at the current ``w``."""
    return lambda: 0.5 * w @ h @ w - c @ w


def gen_accumulated_call(gen, micro: Callable[[int], torch.Tensor], count: int, *,
                         before_step: Callable[[], object] | None = None) -> torch.Tensor:
    """One training call with gradient accumulation over ``count`` micro-batches: ``micro(i) / count``
    forward and backward for each, then GeN's step on the mean of all, given their summed loss."""
    total = 0.0
    for i in range(count):
        part = micro(i) / count
        part.backward()
        total += part.detach()
    if before_step is not None:
        before_step()
    gen.step(lambda: sum(micro(i) for i in range(count)) / count, loss=total)
    gen.zero_grad()
    return total


def micro_batches(seed: int = 4, count: int = 2, n: int = 16, d: int = 5):
    """(w, micro, H): float64 least squares in ``count`` micro-batches of ``n``; ``micro(i)`` is the
    i-th one's loss at the current ``w`` (zeros at first), ``H`` the Hessian of their mean."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(count, n, d, generator=g, dtype=F64), torch.randn(count, n, generator=g, dtype=F64)
    w = torch.zeros(d, dtype=F64, requires_grad=True)
    h = sum(x[i].T @ x[i] for i in range(count)) / (count * n)
    return w, (lambda i: 0.5 * ((x[i] @ w - y[i]) ** 2).mean()), h


class NewtonDirection(torch.optim.Optimizer):
    """w -= lr · H⁻¹ grad."""

    def __init__(self, params, h, lr):
        super().__init__(params, dict(lr=lr))
        self.h_inv = torch.linalg.inv(h)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.sub_(group["lr"] * (self.h_inv @ p.grad))
