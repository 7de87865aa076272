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
    `head(data, n)` is a split cut to its first `n` examples (`trainer.eval_limit`), and
    `examples(parts)` the decoded examples of an evaluation, saved beside its metrics (default:
    none); see each.
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

    def artifacts(self, model: nn.Module, run_dir: Path, step: int) -> dict[str, Path]:
        """Write files of the evaluated `model` at `step` into `run_dir` (default: nothing); the images
        among them, by a name, are returned for the loggers that show images (W&B)."""
        return {}

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

    def head(self, data: Dataset, n: int) -> Dataset:
        """The first `n` examples of evaluation split `data`, for `predict` and `score` to read as a
        whole split (the engine shards it like one). The default, `Head`, serves items and passes
        every attribute on (`collate`); a task whose data set holds attributes about the whole split
        (text generation's `groups`) returns one that describes only those `n`."""
        return data if n >= len(data) else Head(data, n)

    def examples(self, parts: list[Any]) -> list[dict[str, Any]]:
        """What an evaluation decoded, one JSON-ready dict per example in the split's order, from the
        same parts `score` got; the engine saves them beside the metrics. Empty (the default): a task
        whose predictions are numbers has nothing worth reading there."""
        return []

    def evaluate(self, model: nn.Module, loader: DataLoader, to_device) -> dict[str, float]:
        """The split's metrics, in one process."""
        return self.score([self.predict(model, loader, to_device)])


class Head(Dataset):
    """The first `n` items of `whole`; any other attribute is `whole`'s (a `collate`, a vocabulary)."""

    def __init__(self, whole: Dataset, n: int) -> None:
        self.whole, self.n = whole, min(n, len(whole))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.whole[i % self.n]

    def __getattr__(self, name: str) -> Any:
        if name in ("whole", "n") or name.startswith("__"):  # unpickling asks before __init__ ran
            raise AttributeError(name)
        return getattr(self.whole, name)


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
