"""Synthetic 2-D test functions of the paper's Section 5 (Figures 6-7, Appendix B.1).

Deterministic optimisation of f(x1, x2) from a fixed start point; results are *synthetic*
and are labelled so wherever genrun shows them.

* Rosenbrock: ``f = 100(x2 - x1²)² + (1 - x1)²``; minimum f* = 0 at (1, 1), in a narrow
  curved valley. Default start (-1.5, 2), inside the paper's plotted range.
* Beale, in its standard form: ``f = (1.5 - x1 + x1x2)² + (2.25 - x1 + x1x2²)²
  + (2.625 - x1 + x1x2³)²``; minimum f* = 0 at (3, 0.5). Beale is *not* convex,
  although the paper calls it so: its Hessian at (0, 0) is indefinite
  (``tests/test_synthetic.py``). Default start (1, 1.5).

How it runs through the one engine, unchanged: the "model" is :class:`Point`, a module
holding the 2-D parameter w initialised at ``task.start``; the training set is
``task.iterations`` dummy items and the task's config sets ``trainer.batch_size=1`` and
``trainer.epochs=1``, so one epoch is ``task.iterations`` optimizer steps (one step = one
iteration) and the engine evaluates and checkpoints once, at the end. ``loss(model,
batch)`` ignores the batch and returns f(w), so GeN's probes re-evaluate f exactly.
``step_metrics`` adds the iterate (x1, x2) and f after each step to every train record,
so the trajectory is in the run dir's ``metrics.jsonl`` (and in ``trajectory.csv``, written
at the end by the report, not here: tasks never write files).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from genrun.errors import UserError
from genrun.tasks.base import Task

Array = Any  # a torch tensor or a numpy array: the functions below work on both


def rosenbrock(x1: Array, x2: Array) -> Array:
    """``100(x2 - x1²)² + (1 - x1)²``, elementwise (tensors or numpy arrays)."""
    return 100.0 * (x2 - x1 * x1) ** 2 + (1.0 - x1) ** 2


def beale(x1: Array, x2: Array) -> Array:
    """``(1.5 - x1 + x1x2)² + (2.25 - x1 + x1x2²)² + (2.625 - x1 + x1x2³)²``, elementwise."""
    return (1.5 - x1 + x1 * x2) ** 2 + (2.25 - x1 + x1 * x2**2) ** 2 + (2.625 - x1 + x1 * x2**3) ** 2


class Point(nn.Module):
    """The "model" of a 2-D function: one parameter ``w = (x1, x2)``, started at ``start``.

    ``dtype``: float32 (the default, as for every other genrun model) or float64.
    """

    def __init__(self, start: Sequence[float], dtype: str = "float32") -> None:
        super().__init__()
        start = [float(v) for v in start]
        if len(start) != 2 or not all(math.isfinite(v) for v in start):
            raise UserError(f"task.start must be two finite numbers [x1, x2], got {list(start)}")
        if dtype not in ("float32", "float64"):
            raise UserError(f"model.dtype must be float32 or float64, got {dtype}")
        self.w = nn.Parameter(torch.tensor(start, dtype=getattr(torch, dtype)))

    def forward(self) -> Tensor:
        return self.w


class Function2D(Task):
    """A deterministic 2-D objective as a task; subclasses set the function and its facts.

    ``start``: the initial point [x1, x2] (null: the class's ``default_start``).
    ``iterations``: how many optimizer steps one epoch has (the dummy training set's length).
    """

    name = "function2d"
    function: Callable[[Array, Array], Array]
    minimum: tuple[float, float]
    f_min: float = 0.0
    default_start: tuple[float, float]
    #: the plotted region of the paper's Figures 6/7 contour plots: (x1 range, x2 range)
    plot_range: tuple[tuple[float, float], tuple[float, float]]

    def __init__(self, start: Sequence[float] | None = None, iterations: int = 1000, **_: object) -> None:
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            raise UserError(f"task.iterations must be an integer >= 1, got {iterations}")
        self.start = tuple(float(v) for v in (start if start is not None else self.default_start))
        if len(self.start) != 2:
            raise UserError(f"task.start must be two numbers [x1, x2], got {list(self.start)}")
        self.iterations = iterations

    def value(self, w: Tensor) -> Tensor:
        """f at the 2-vector w (differentiable). Subclasses may override with a form that
        takes fewer tensor ops (each op costs microseconds of dispatch on a 2-vector)."""
        x1, x2 = w.unbind()
        return type(self).function(x1, x2)

    def value_float(self, x1: float, x2: float) -> float:
        """f at a point, in plain Python float64 (no tensor ops: for logging)."""
        return float(type(self).function(x1, x2))

    # -- the Task interface ----------------------------------------------------------
    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        # N dummy items: with batch_size 1 an epoch is N iterations; one eval item.
        return _Dummy(self.iterations), {"test": _Dummy(1)}

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        return self.value(model())

    def metric_sums(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        value = self.value(model()).detach().double()
        return {"objective": value, "gap": value - self.f_min, "count": torch.tensor(1.0)}

    @torch.no_grad()
    def predict(self, model: nn.Module, loader: DataLoader, to_device) -> dict[str, float]:
        """The objective at the current point and its gap to the minimum (no data involved)."""
        w = model().detach()
        value = float(self.value(w))
        return {"objective": value, "gap": value - self.f_min, "x1": float(w[0]), "x2": float(w[1])}

    def score(self, parts: list[dict[str, float]]) -> dict[str, float]:
        return parts[0]  # every share saw the same point

    @torch.no_grad()
    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        """The iterate after this step and f there: the trajectory, one record per step."""
        x1, x2 = model().detach().tolist()
        try:
            objective = self.value_float(x1, x2)
        except OverflowError:  # a diverging iterate: float64 overflows where tensors give inf
            objective = math.inf
        return {"x1": x1, "x2": x2, "objective": objective}


class Rosenbrock(Function2D):
    """``100(x2 - x1²)² + (1 - x1)²``: minimum 0 at (1, 1) in a curved valley (non-convex)."""

    name = "rosenbrock"
    function = staticmethod(rosenbrock)
    minimum = (1.0, 1.0)
    default_start = (-1.5, 2.0)
    plot_range = ((-2.0, 1.5), (-1.0, 4.0))


class Beale(Function2D):
    """Beale's function (standard form): minimum 0 at (3, 0.5); not convex."""

    name = "beale"
    function = staticmethod(beale)
    minimum = (3.0, 0.5)
    default_start = (1.0, 1.5)
    plot_range = ((-3.0, 3.5), (-3.0, 3.0))
    _consts: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    def value(self, w: Tensor) -> Tensor:
        # Σ_k (c_k - x1 + x1·x2^k)², k = 1..3, in five tensor ops instead of twenty.
        if w.dtype not in self._consts or self._consts[w.dtype][0].device != w.device:
            self._consts[w.dtype] = (torch.tensor([1.5, 2.25, 2.625], dtype=w.dtype, device=w.device),
                                     torch.tensor([1.0, 2.0, 3.0], dtype=w.dtype, device=w.device))
        c, k = self._consts[w.dtype]
        x1, x2 = w.unbind()
        terms = torch.addcmul(c - x1, x2.pow(k), x1)
        return torch.dot(terms, terms)


class _Dummy(Dataset):
    """`size` placeholder items: an epoch of `size` steps at batch_size 1. Strings, because
    the default collate passes them through untouched (no tensor built per step)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> str:
        return ""


FUNCTIONS: dict[str, type[Function2D]] = {"rosenbrock": Rosenbrock, "beale": Beale}
