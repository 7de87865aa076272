"""The task plug-in interface: what the engine needs from a task, and nothing more.

A task knows its data, its loss and its metrics. It knows nothing about optimizers, GeN,
devices or logging: the engine moves batches to the device and calls these methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

#: Accuracy at most this multiple of chance (1/classes) reads as a dead network: one that
#: predicts one class for everything ends with a finite loss, so nothing else flags it
#: (seen: SGD at lr 0.2 on mnist5k, 10 % from the first epoch on).
CHANCE_FACTOR = 1.5


def at_chance(acc: float, num_classes: int) -> bool:
    """Whether accuracy ``acc`` (a fraction) is within ``CHANCE_FACTOR`` of guessing."""
    return num_classes > 1 and acc <= CHANCE_FACTOR / num_classes


@dataclass(frozen=True)
class Objective:
    """One of a task's objectives: `loss(model, batch)` trains `module`'s parameters only."""

    name: str
    module: nn.Module
    loss: Callable[[nn.Module, Any], torch.Tensor]


class Task:
    """Base class of every task. Subclasses set `name` and implement the three methods.

    `datasets()` returns the training set and a dict of evaluation sets by split name; a
    training set with `set_epoch(epoch)` (PyTorch's convention) is told each epoch first; a
    data set with a `collate(items)` method batches its own items (e.g. padding text).
    `loss(model, batch)` is the scalar training objective of one (micro-)batch.
    `predict(model, loader, to_device)` reduces a split, or one process's share of it (a
    `genrun.parallel.Share`), to what `score` needs (picklable, on the CPU); `score(parts)` turns
    the parts of every share, in order, into the split's metrics. Data-parallel processes each predict a
    share and score the gathered parts; one process scores `[predict(whole split)]`
    (`evaluate`). The default `predict` sums `metric_sums` over batches and `score` divides by
    the count, which suits averages such as accuracy; F1, BLEU or mAP keep predictions instead.
    `step_metrics(model)` may add numbers to every logged train record.
    `diagnose(results)` may return a one-line warning about a finished run's final metrics.
    `objectives(model)` may name several objectives (a GAN's "D" then "G"), each trained by its own
    optimizer on its own parameters, in that order within every step; None (the default): one,
    `loss`, over the whole model. `partial_forward`: some forwards leave trainable parameters
    without a gradient (DDP must look for them: its `find_unused_parameters`).
    `artifacts(model, run_dir, step)` may write files (e.g. image samples) at each evaluation, in
    the main process.
    `heavy_items`: making an item costs real work (decoding an image file, drawing a scene),
    so on a GPU DataLoader worker processes pay for themselves; in-memory items do not.
    """

    name: str = "task"
    heavy_items: bool = False
    partial_forward: bool = False

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def metric_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Per-batch sums of each metric plus `count`, the number of examples."""
        raise NotImplementedError

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        """Extra numbers for each logged train record (e.g. the iterate of a 2-D function)."""
        return {}

    def objectives(self, model: nn.Module) -> list[Objective] | None:
        """The objectives to train in turn, or None: `loss` over all of `model`."""
        return None

    def artifacts(self, model: nn.Module, run_dir: Path, step: int) -> None:
        """Write files of the evaluated `model` at `step` into `run_dir` (default: nothing)."""

    def diagnose(self, results: dict[str, dict[str, float]]) -> str | None:
        """A warning when the final metrics show the run learned nothing (None: nothing to say)."""
        return None

    @torch.no_grad()
    def predict(self, model: nn.Module, loader: DataLoader, to_device) -> Any:
        totals: dict[str, torch.Tensor] = {}
        for batch in loader:
            for key, value in self.metric_sums(model, to_device(batch)).items():
                totals[key] = totals.get(key, 0) + value.detach().double()
        return {key: float(value) for key, value in totals.items()}

    def score(self, parts: list[Any]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for part in parts:
            for key, value in part.items():
                totals[key] = totals.get(key, 0.0) + value
        count = totals.pop("count", 0.0)
        return {key: value / max(count, 1.0) for key, value in totals.items()}

    def evaluate(self, model: nn.Module, loader: DataLoader, to_device) -> dict[str, float]:
        """The split's metrics, in one process."""
        return self.score([self.predict(model, loader, to_device)])


class ClassificationTask(Task):
    """Batches are `(inputs, labels)`; the loss is cross-entropy; metrics are loss and accuracy."""

    num_classes: int

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(model(inputs), labels)

    def diagnose(self, results: dict[str, dict[str, float]]) -> str | None:
        for split, metrics in results.items():
            acc = metrics.get("acc")
            if acc is not None and at_chance(acc, self.num_classes):
                return (f"{split} accuracy {100 * acc:.1f} % is at chance ({self.num_classes} classes): the network "
                        "learned nothing or collapsed to one class; metrics.jsonl has its loss and lr per step")
        return None

    def metric_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        inputs, labels = batch
        logits = model(inputs).float()
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(dim=-1) == labels).sum()
        return {"loss": loss, "acc": correct, "count": torch.tensor(labels.numel())}


def pad(rows: list[torch.Tensor] | tuple[torch.Tensor, ...], value: int, left: bool = False) -> torch.Tensor:
    """1-D tensors of different lengths (token ids) stacked into ``[len(rows), longest]``, filled with
    `value` after each row, or before it when `left` (decoder-only generation)."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        if left:
            out[i, out.shape[1] - len(row):] = row
        else:
            out[i, :len(row)] = row
    return out
