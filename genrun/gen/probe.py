"""Probe forwards that leave the model and the random stream as they found them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def rng_state() -> dict[str, Any]:
    """CPU generator state, plus every CUDA device's if CUDA is already initialised.

    CUDA is not initialised here on purpose: doing so costs seconds and memory on
    every device for a run that never touched the GPU.
    """
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class ProbeScope:
    """Context for the probe forwards of one step.

    * Buffers: with ``model`` given, every buffer (BatchNorm running mean/var,
      ``num_batches_tracked``, anything a module registers) is copied on entry and
      written back by :meth:`settle`, so the probes, which run in the caller's training
      mode to evaluate the same function as the training forward, do not move running
      statistics at perturbed weights.  The tensor objects are put back on exit too, in
      case a module rebinds a buffer instead of updating it in place.
    * RNG: the state at entry (after the training forward and backward) is restored
      by :meth:`settle`, so the training stream is the same with or without probing.
      If ``replay`` holds the state captured right before the training forward
      (``GeN.remember_rng``), :meth:`before_call` rewinds to it before every closure
      call, so dropout draws the training forward's masks and each probe evaluates
      the very function whose gradient produced the step.

    :func:`probe_losses` settles as soon as its forwards are queued, before the
    caller's host sync: the restore copies then run on the device right behind the
    probes, and nothing is left for after the sync, where the device waits on the
    host.  ``__exit__`` settles only if a closure ran since.
    """

    def __init__(self, model: nn.Module | None, replay: dict[str, Any] | None) -> None:
        self.model = model
        self.replay = replay
        self._buffers: list[tuple[nn.Module, str, Tensor]] = []
        self._saved: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        self._rng: dict[str, Any] | None = None
        self._dirty = False

    def __enter__(self) -> ProbeScope:
        self._rng = rng_state()
        if self.model is not None:
            with torch.no_grad():
                for module in self.model.modules():
                    for name, buf in module._buffers.items():
                        if buf is not None:
                            self._buffers.append((module, name, buf))
                            live, saved = self._saved.setdefault((buf.device, buf.dtype), ([], []))
                            live.append(buf)
                            saved.append(torch.empty_like(buf))
                # one fused copy per dtype (a ResNet has ~60 BatchNorm buffers, float and int64):
                # a mixed list would fall back to one copy per buffer
                for live, saved in self._saved.values():
                    torch._foreach_copy_(saved, live)
        return self

    def before_call(self) -> None:
        self._dirty = True
        if self.replay is not None:
            set_rng_state(self.replay)

    def settle(self) -> None:
        """Put the buffers' values and the RNG state back as they were on entry (no sync)."""
        if not self._dirty:
            return
        with torch.no_grad():
            for live, saved in self._saved.values():
                torch._foreach_copy_(live, saved)
        if self._rng is not None:
            set_rng_state(self._rng)
        self._dirty = False

    def __exit__(self, *exc: object) -> None:
        self.settle()
        for module, name, buf in self._buffers:
            module._buffers[name] = buf
        self._buffers, self._saved = [], {}


def as_loss(value: Any, device: torch.device | None = None) -> Tensor:
    """A closure's return value (tensor or number) as a float64 scalar tensor, detached.

    float64 so that differences of nearby losses keep their digits in the fit; MPS
    has no float64, so there it stays float32.
    """
    t = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
    if t.numel() != 1:
        raise ValueError(f"the closure must return a scalar loss, got shape {tuple(t.shape)}")
    dev = device if device is not None else t.device
    dtype = torch.float32 if dev.type == "mps" else torch.float64
    return t.reshape(()).to(dev, dtype)


def probe_losses(
    closure: Callable[[], Any],
    place: Callable[[float], None],
    points: Sequence[float],
    scope: ProbeScope,
    device: torch.device | None = None,
) -> list[Tensor]:
    """``[L(w_t - s·δ) for s in points]`` as device scalars: Algorithm 1 line 5.

    Runs under ``torch.no_grad()`` (no activations kept, so the probes cost less than
    the training forward and raise no memory peak); the caller's autocast belongs
    inside ``closure``.  Values stay on the device: the caller gathers them into one
    tensor and syncs once.  The scope is settled before returning (buffers and RNG
    as on entry; the parameters stay at the last point).
    """
    out = []
    with torch.no_grad():
        for s in points:
            place(float(s))
            scope.before_call()
            out.append(as_loss(closure(), device))
            if device is None:
                device = out[-1].device
    scope.settle()
    return out
