"""Evaluation while training and at its end: which splits, how much of each, and what is kept.

During training (each epoch's end with `trainer.eval_epochs`, every `trainer.eval_every` steps)
the engine scores the splits `trainer.eval_splits` names (null: all), each cut to its first
`trainer.eval_limit` examples: the same examples every time, so the curves compare. The cut is
the task's own (`Task.head`): a generic first-N view serves items and passes the data set's
attributes on, and a task whose data set describes the whole split (text generation's MR groups,
which decoding runs over) returns one describing only those N. The engine shards that cut as it
shards a whole split, so each data-parallel process predicts its share of the same N examples.

The evaluation at the end of training scores every split whole, whatever the settings, and
`final` (summary.json's) only ever holds a whole evaluation of every split.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from genrun import parallel
from genrun.errors import UserError
from genrun.runtime import to_device

if TYPE_CHECKING:  # the engine builds an Evaluator; only a type checker needs its classes here
    from genrun.engine import Position, Records
    from genrun.step import Stepper
    from genrun.tasks.base import Task


def check_splits(chosen: list[str] | None, eval_sets: dict[str, Dataset]) -> list[str]:
    """The splits `trainer.eval_splits` names (None: all), or a one-line UserError naming the task's."""
    if chosen is None:
        return list(eval_sets)
    unknown = [split for split in chosen if split not in eval_sets]
    if unknown:
        raise UserError(f"trainer.eval_splits: the task has no split {unknown[0]!r} "
                        f"(its splits: {', '.join(eval_sets) or 'none'})")
    return list(dict.fromkeys(chosen))


def loaders(eval_sets: dict[str, Dataset], batch_size: int, loading: dict[str, Any]) -> dict[str, DataLoader]:
    """Each process's share of every evaluation split."""
    return {  # private generators: evaluating must not move the training's random stream
        split: DataLoader(parallel.shard(data), batch_size=batch_size, collate_fn=getattr(data, "collate", None),
                          generator=torch.Generator().manual_seed(0), **loading)
        for split, data in eval_sets.items()
    }


class Evaluator:
    """Runs the evaluations a run asks for, logs each split's scores (and decoded examples) as
    they come, and keeps the latest whole evaluation as `final`."""

    def __init__(self, task: Task, eval_sets: dict[str, Dataset], tc: DictConfig, loading: dict[str, Any],
                 device: torch.device, stepper: Stepper, records: Records, at: Position,
                 run_dir: Path | None = None) -> None:
        self.task, self.device, self.stepper, self.records, self.at = task, device, stepper, records, at
        self.run_dir = run_dir  # process 0's, where the task's files of each evaluation go (Task.artifacts)
        self.every, self.each_epoch = tc.eval_every, tc.get("eval_epochs", True)
        batch_size, limit = tc.eval_batch_size or tc.batch_size, tc.get("eval_limit")
        self.whole = loaders(eval_sets, batch_size, loading)
        cut = {split: task.head(eval_sets[split], limit) if limit else eval_sets[split]
               for split in check_splits(tc.get("eval_splits"), eval_sets)}
        cut_any = list(cut) != list(eval_sets) or any(cut[s] is not eval_sets[s] for s in cut)
        self.during = loaders(cut, batch_size, loading) if cut_any else self.whole
        self.final: dict[str, dict[str, float]] = {}

    def due(self, step: int) -> bool:
        """Whether `trainer.eval_every` asks for an evaluation after `step`."""
        return bool(self.every) and step % self.every == 0

    def epoch_end(self, step: int, total_steps: int) -> None:
        """An epoch's end: the whole evaluation when training is over, else one as the settings ask."""
        if step == total_steps:
            self.run(self.whole)
        elif self.each_epoch or self.due(step):
            self.run(self.during)

    def run(self, which: dict[str, DataLoader] | None = None) -> None:
        """Score each split of `which` (None: those evaluated during training), logging as it goes."""
        which = self.during if which is None else which
        model, results = self.stepper.evaluating(), {}
        for split, loader in which.items():
            started = time.perf_counter()
            with self.stepper.amp():  # each process predicts its share of the split; all score every share's part
                part = self.task.predict(model, loader, partial(to_device, device=self.device))
            parts = parallel.parts(part, loader.dataset)
            results[split] = self.task.score(parts)
            self.records.eval(self.at, split, results[split], eval_s=time.perf_counter() - started,
                              eval_n=len(parallel.share_of(loader.dataset)[0]))
            self.records.examples(self.at, split, self.task.examples(parts))
        if self.run_dir is not None:
            self.records.images(self.at, self.task.artifacts(model, self.run_dir, self.at.step))
        if which is self.whole:
            self.final = results
