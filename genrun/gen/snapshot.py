"""``StepSnapshot``: the two ends of the step just taken, and moves along it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_ALIGN = 16  # elements; keeps every view 16-element aligned so foreach kernels vectorise


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bfloat16 parameters (a bf16 sum keeps 3 digits), else the dtype."""
    return torch.promote_types(dtype, torch.float32)


class _Flat:
    """One flat, zero-padded buffer for parameters sharing a device and dtype, with views."""

    def __init__(self, params: list[Tensor], where: str) -> None:
        self.params = params
        p0 = params[0]
        sizes = [-(-p.numel() // _ALIGN) * _ALIGN for p in params]
        pin = where == "cpu" and p0.is_cuda and torch.cuda.is_available()
        device = p0.device if where == "device" else torch.device("cpu")
        # zeros: the padding must add nothing to the reductions over the whole buffer
        self.buf = torch.zeros(sum(sizes), dtype=p0.dtype, device=device, pin_memory=pin)
        self.views = [c[: p.numel()].view(p.shape) for c, p in zip(self.buf.split(sizes), params)]
        self.on_device = device == p0.device  # else: host copies of device parameters

    def copy_from_params(self) -> None:
        if self.on_device:
            torch._foreach_copy_(self.views, self.params)
        else:
            for v, p in zip(self.views, self.params):
                v.copy_(p.detach(), non_blocking=True)


class StepSnapshot:
    """Keeps ``w_t`` and ``w_{t+1}`` of the trainable parameters for one probe step.

    Every point GeN visits is ``w(s) = w_t - s·δ`` with ``δ = w_t - w_{t+1}``, and is
    written as ``lerp(w_t, w_{t+1}, s)`` from the two stored ends, never by adding
    and subtracting δ in place.  So ``s = 0`` is bit-exactly ``w_t`` (a dropout-replayed
    probe reproduces the training loss exactly), ``s = 1`` is bit-exactly the base
    optimizer's ``w_{t+1}`` (a rejected probe leaves no trace), and the final
    ``w_t - r·δ`` carries one rounding however many probes ran.  In bf16, where one
    ulp is 0.4 %, add/subtract round trips would be a random walk on the weights.

    The price is two copies of the trainable parameters during a probe step (freed
    by :meth:`release`).  They are flat buffers per (device, dtype), so the copies,
    moves and the two reductions of :meth:`slope_and_norm` are a handful of kernel
    launches rather than several per parameter tensor.  ``where="cpu"`` keeps both
    in (pinned) host memory, so peak device memory is the base optimizer's plus one
    parameter tensor in flight; each probe then streams the parameters to the device
    twice, tensor by tensor.
    """

    def __init__(self, params: Sequence[Tensor], where: str = "device") -> None:
        self.params = list(params)
        self.where = where
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in self.params:
            groups.setdefault((p.device, p.dtype), []).append(p)
        self.params = [p for ps in groups.values() for p in ps]  # grouped order
        with torch.no_grad():
            self.w_t = [_Flat(ps, where) for ps in groups.values()]
            for f in self.w_t:
                f.copy_from_params()
        self.w_next: list[_Flat] | None = None
        self._at: float | None = None  # the s the parameters sit at (None: unknown; the base step moves them)

    def after_step(self) -> None:
        """Record ``w_{t+1}``; call right after the base optimizer's step."""
        with torch.no_grad():
            self.w_next = [_Flat(f.params, self.where) for f in self.w_t]
            for f in self.w_next:
                f.copy_from_params()
        self._at = 1.0

    @staticmethod
    def _dev(x: Tensor, p: Tensor) -> Tensor:
        return x if x.device == p.device else x.to(p.device, non_blocking=True)

    def _pairs(self) -> list[tuple[_Flat, _Flat]]:
        assert self.w_next is not None, "after_step() first"
        return list(zip(self.w_t, self.w_next))

    def deltas(self) -> list[Tensor]:
        """``δ = w_t - w_{t+1}`` per parameter, on the parameters' devices (new tensors)."""
        return [self._dev(a, p) - self._dev(b, p)
                for ft, fn in self._pairs() for a, b, p in zip(ft.views, fn.views, ft.params)]

    def slope_and_norm(self, device: torch.device) -> Tensor:
        """``[‖δ‖², Σ grad·δ]`` as one float64 tensor on ``device`` (no host sync).

        ``Σ grad·δ = β``: the derivative of the training loss along ``-δ`` at ``w_t``,
        read from the gradient the base step consumed (unscaled, if a GradScaler
        stepped; accumulated, with gradient accumulation).  Products are formed in the
        parameters' dtype and summed in at least fp32.
        """
        parts = []
        with torch.no_grad():
            for ft, fn in self._pairs():
                acc = accumulation_dtype(ft.buf.dtype)
                grads = [p.grad for p in ft.params]
                if ft.on_device:
                    d = ft.buf - fn.buf  # one transient copy
                    dd = torch.linalg.vector_norm(d, dtype=acc).square()
                    sizes = [v.numel() for v in ft.views]
                    d_views = [c[: v.numel()].view(v.shape) for c, v in
                               zip(d.split([-(-n // _ALIGN) * _ALIGN for n in sizes]), ft.views)]
                    torch._foreach_mul_(d_views, grads)  # padding stays 0
                    parts.append(torch.stack([dd, d.sum(dtype=acc)]).to(device, torch.float64))
                    continue
                for a, b, p, g in zip(ft.views, fn.views, ft.params, grads):
                    d = self._dev(a, p) - self._dev(b, p)
                    pair = torch.stack([torch.sum(d * d, dtype=acc), torch.sum(g * d, dtype=acc)])
                    parts.append(pair.to(device, torch.float64))
        if not parts:
            return torch.zeros(2, dtype=torch.float64, device=device)
        return torch.stack(parts).sum(0)

    def place(self, s: float) -> None:
        """Set the parameters to ``w_t - s·δ = lerp(w_t, w_{t+1}, s)``.

        Free when they are there already (the first probe at s = 1 right after the step).
        """
        if s == self._at:
            return
        self._at = None  # until every copy below is queued
        with torch.no_grad():
            for ft, fn in self._pairs():
                src = fn if s == 1.0 else ft
                if ft.on_device:
                    torch._foreach_copy_(ft.params, src.views)
                    if s not in (0.0, 1.0):
                        torch._foreach_lerp_(ft.params, fn.views, float(s))
                    continue
                for a, b, p in zip(src.views, fn.views, ft.params):
                    p.copy_(a, non_blocking=True)
                    if s not in (0.0, 1.0):
                        p.lerp_(self._dev(b, p), float(s))
        self._at = s

    def keep_delta(self) -> list[Tensor]:
        """Turn the stored ``w_t`` into ``w_t - w`` (w: the parameters now, the step as taken), drop
        ``w_{t+1}``, and return those differences per parameter, in :attr:`params` order."""
        with torch.no_grad():
            for ft in self.w_t:
                if ft.on_device:
                    torch._foreach_sub_(ft.views, ft.params)
                else:
                    for v, p in zip(ft.views, ft.params):
                        v.sub_(p.detach().to(v.device))
        self.w_next, self._at = None, None
        return [v for ft in self.w_t for v in ft.views]

    def release(self) -> None:
        """Drop both copies (the caching allocator reuses them on the next probe)."""
        self.w_t = []
        self.w_next = None
