"""The task plug-in interface: what the engine needs from a task, and nothing more.

A task knows its data, its loss and its metrics. It knows nothing about optimizers, GeN,
devices or logging: the engine moves batches to the device and calls these methods.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class Task:
    """Base class of every task. Subclasses set `name` and implement the three methods.

    `datasets()` returns the training set and a dict of evaluation sets by split name.
    `loss(model, batch)` is the scalar training objective of one (micro-)batch.
    `evaluate(model, loader, to_device)` returns metrics averaged over a whole split; the
    default sums `metric_sums` over batches, which suits averages such as accuracy.
    `step_metrics(model)` may add numbers to every logged train record.
    """

    name: str = "task"

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

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, to_device) -> dict[str, float]:
        totals: dict[str, torch.Tensor] = {}
        for batch in loader:
            for key, value in self.metric_sums(model, to_device(batch)).items():
                totals[key] = totals.get(key, 0) + value.detach().double()
        count = float(totals.pop("count"))
        return {key: float(value) / max(count, 1.0) for key, value in totals.items()}


class ClassificationTask(Task):
    """Batches are `(inputs, labels)`; the loss is cross-entropy; metrics are loss and accuracy."""

    num_classes: int

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(model(inputs), labels)

    def metric_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        inputs, labels = batch
        logits = model(inputs).float()
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(dim=-1) == labels).sum()
        return {"loss": loss, "acc": correct, "count": torch.tensor(labels.numel())}
