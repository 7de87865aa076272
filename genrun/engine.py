"""The one training loop every task runs through.

Read it top to bottom: build the task, model, and the `Stepper` (optimizer, GeN-wrapped or not,
schedule, precision); optionally restore a checkpoint; then for each optimizer step run the
forward/backward over `grad_accum` micro-batches, take the step, log, evaluate and checkpoint.
The engine never looks at a task's name: tasks are plug-ins behind `genrun.tasks.Task`. With
`trainer.devices > 1` this same loop runs in each data-parallel process (`genrun.launch` starts
them, `genrun.parallel` has what each one calls).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from genrun import atomic, checkpoint, evaluation, parallel, stop, versions
from genrun.console import Progress
from genrun.errors import AlreadyFinished
from genrun.runtime import (
    EpochBatches,
    loader_workers,
    params_finite,
    peak_memory_mb,
    pick_device,
    seed_everything,
    to_device,
)
from genrun.sinks import PREDICTIONS, JsonlSink, Sink, build_sink
from genrun.step import Stepper


def train(cfg: DictConfig, run_dir: Path, *, group: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Train as `cfg` says, writing metrics, GeN probes, checkpoints and summary.json into `run_dir`.

    Returns the summary; its `status` is "finished" or "diverged" (an exception, Ctrl-C included,
    leaves "interrupted" or "failed" in summary.json and propagates).
    """
    started = time.perf_counter()
    tc = cfg.trainer
    rank, world = parallel.rank(), parallel.world()  # 0, 1 unless trainer.devices > 1
    main = rank == 0  # the process that writes the run's files
    device = pick_device(tc.device, parallel.local_rank())
    software = {**versions(), "torch": torch.__version__,  # with its build tag (+cu130, +cpu)
                **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})}
    if tc.get("threads") or (world > 1 and device.type == "cpu"):
        torch.set_num_threads(tc.get("threads") or parallel.cpu_threads())
    resume = checkpoint.load(tc.resume) if tc.resume else None
    seed_everything(cfg.seed)

    # -- the task, the model and the data ------------------------------------------------
    with parallel.main_first():  # a download (task.download, Hub weights) happens once, then the others read it
        task = instantiate(cfg.task)
        train_set, eval_sets = task.datasets()
        model = instantiate(cfg.model).to(device)
    evaluation.check_splits(tc.get("eval_splits"), eval_sets)  # before the run dir gets any file
    # the training forward goes through DDP; evaluation, metrics and checkpoints use the model itself
    train_model = parallel.wrap(model, device, tc.get("ddp_find_unused", False) or task.partial_forward)
    if rank:  # replicas start alike (DDP copies process 0's weights), then draw their own dropout
        seed_everything(cfg.seed + 1_000_003 * rank)
    steps_per_epoch = math.ceil(len(train_set) / (tc.batch_size * tc.grad_accum))
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    if resume is not None and resume["step"] >= total_steps:  # before any file of the run is touched
        checkpoint.rng_of(resume, rank, world)  # another process count is bad input, finished or not
        raise AlreadyFinished(f"{tc.resume} has already trained {resume['step']} of {total_steps} steps; nothing "
                              "changed (raise trainer.max_steps or trainer.epochs to train longer)")
    # data are a function of (seed, epoch, index), never of the worker that loads them: any count
    # of workers gives the same run
    loading = {"num_workers": loader_workers(tc.num_workers, device, parallel.cpu_threads(), task.heavy_items),
               "pin_memory": device.type == "cuda"}
    data = TrainData(train_set, cfg, loading, device, rank, world)

    # -- optimizer, GeN, schedule, precision ---------------------------------------------
    stepper = Stepper.build(cfg, task, model, train_model, device, total_steps, world)

    # -- resume ----------------------------------------------------------------------------
    at = Position()
    clock = Clock(started, float(resume.get("elapsed_s", 0.0)) if resume is not None else 0.0)
    ckpts = Checkpoints(run_dir / checkpoint.FILENAME, main, world, clock,
                        last=resume["step"] if resume is not None else None)
    if resume is not None:
        stepper.load_state_dict(resume, tc.resume)
        at = Position(resume["step"], resume["epoch"], resume["batch_in_epoch"])
        checkpoint.set_rng_state(checkpoint.rng_of(resume, rank, world))
        if main:
            _drop_records_after(run_dir, at.step)
    records = Records([JsonlSink(run_dir), build_sink(cfg.logger, run_dir, config=_plain(cfg), group=group,
                                                      name=name, resume=resume is not None)] if main else [],
                      stepper, clock)
    evals = evaluation.Evaluator(task, eval_sets, tc, loading, device, stepper, records, at, run_dir if main else None)

    # -- the loop --------------------------------------------------------------------------
    status, message = "finished", None
    progress = Progress(tc.progress, total_steps, at.step, enabled=main)
    stop.defer(world == 1)  # one process: SIGTERM ends the current step first (several must stop in lockstep)
    try:
        for micro in data.steps(at, total_steps, steps_per_epoch):
            if not micro:  # an epoch's end (or the run's): evaluate, and checkpoint where the next epoch starts
                evals.epoch_end(at.step, total_steps)
                at.next_epoch(total_steps)
                ckpts.save(stepper, at)
                continue
            loss = stepper.backward(micro)
            if not math.isfinite(loss):
                status, message = "diverged", f"loss is {loss} at step {at.step + 1}; {ckpts.kept()}"
                break
            stepper.step(micro)
            at.step, at.batch_in_epoch = at.step + 1, at.batch_in_epoch + 1

            if at.step % tc.log_every == 0 or at.step == total_steps:
                records.train(at, loss, {**stepper.step_metrics(), **task.step_metrics(model)})
            records.gen(stepper.gen_records())
            progress.update(at.step, at.epoch, loss, stepper.lrs()[0])
            ends_epoch = at.ends_epoch(steps_per_epoch, total_steps)  # evaluated and checkpointed at the end
            if evals.due(at.step) and not ends_epoch:
                evals.run()
            if tc.ckpt_every and at.step % tc.ckpt_every == 0 and not ends_epoch:
                ckpts.save(stepper, at)
            if stop.pending() and at.step < total_steps:  # a stop signal: end here, with this step checkpointed
                ckpts.save(stepper, at)
                stop.now()
    except BaseException as err:  # Ctrl-C, a crash: the run did not finish, whatever it had evaluated
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        message = f"{_cause(err)} after {at.step} steps; {ckpts.kept()}"
        raise
    finally:
        stop.defer(False)
        progress.close()
        summary = {
            "status": status, "message": message, "step": at.step, "epoch": at.epoch, "total_steps": total_steps,
            "final": evals.final,
            "warning": "; ".join(filter(None, (task.diagnose(evals.final), stepper.gen_idle()))) or None
            if status == "finished" else None,
            "lr": stepper.lrs(), "gen": stepper.gen_summary(),
            "wall_time_s": round(time.perf_counter() - started, 3),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "device": str(device), "devices": world, "run_dir": str(run_dir), "versions": software,
        }
        _write_summary(summary, run_dir if main else None, records)
    return summary


@dataclass
class Position:
    """Where the run is: optimizer steps taken, the epoch, and the steps taken in that epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def ends_epoch(self, steps_per_epoch: int, total_steps: int) -> bool:
        return self.batch_in_epoch >= steps_per_epoch or self.step == total_steps

    def next_epoch(self, total_steps: int) -> None:
        """On to the next epoch's start, unless the run has ended (its position then stays at its last step)."""
        if self.step < total_steps:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


class TrainData:
    """The training split, step after step: each step's `grad_accum` micro-batches, on the device."""

    def __init__(self, dataset: Dataset, cfg: DictConfig, loading: dict[str, Any], device: torch.device,
                 rank: int, world: int) -> None:
        self.dataset, self.seed, self.loading, self.device = dataset, cfg.seed, loading, device
        self.batch_size, self.grad_accum, self.rank, self.world = (cfg.trainer.batch_size, cfg.trainer.grad_accum,
                                                                   rank, world)

    def steps(self, at: Position, total_steps: int, steps_per_epoch: int) -> Iterator[list[Any]]:
        """Each step's micro-batches from `at` on, epoch after epoch, as the caller advances `at`; an
        empty list where an epoch ends, after its data ran out (or the run ended): a run stopped at an
        epoch's last step resumes with that empty list, so the epoch's end is not lost."""
        while at.step < total_steps:
            batches = self.epoch(at.epoch, at.batch_in_epoch)
            micro = self.take(batches)
            while at.step < total_steps and micro:
                yield micro
                micro = self.take(batches)
            if at.ends_epoch(steps_per_epoch, total_steps):
                yield []

    def epoch(self, epoch: int, batch_in_epoch: int) -> Iterator[Any]:
        """The batches of `epoch` from its step `batch_in_epoch` on."""
        sampler = EpochBatches(len(self.dataset), self.batch_size, self.seed, epoch,
                               start=batch_in_epoch * self.grad_accum, rank=self.rank, world=self.world)
        if hasattr(self.dataset, "set_epoch"):  # PyTorch's convention for data that differs per epoch
            self.dataset.set_epoch(epoch)
        # a generator of its own: starting an iterator draws a worker seed, which from the global RNG
        # would shift every later draw (dropout, Cloze masks) between a resumed and an unbroken run
        loader_rng = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return iter(DataLoader(self.dataset, batch_sampler=sampler, **self.loading,
                               collate_fn=getattr(self.dataset, "collate", None), generator=loader_rng))

    def take(self, batches: Iterator[Any]) -> list[Any]:
        return [to_device(b, self.device) for _, b in zip(range(self.grad_accum), batches)]


@dataclass
class Clock:
    """Seconds since the run started, counting on from a resumed checkpoint's `elapsed_s` (so train
    and evaluation time read off one axis across a resume; the time a killed run spent after its
    last checkpoint is redone, not counted twice)."""

    started: float  # time.perf_counter() when this process's run began
    offset: float = 0.0

    def __call__(self) -> float:
        return round(self.offset + time.perf_counter() - self.started, 3)


class Records:
    """The run's train, eval and GeN records, to every sink (process 0's; the others have none)."""

    def __init__(self, sinks: list[Sink], stepper: Stepper, clock: Clock) -> None:
        self.sinks, self.stepper, self.clock = sinks, stepper, clock

    def train(self, at: Position, loss: float, extra: dict[str, float]) -> None:
        self._emit({"kind": "train", "step": at.step, "epoch": at.epoch, "split": "train", "loss": loss,
                    "lr": self.stepper.lrs(), **extra, "time_s": self.clock()})

    def eval(self, at: Position, split: str, scores: dict[str, float], *, eval_s: float, eval_n: int) -> None:
        """One split's scores; `eval_s`: how long scoring it took, `eval_n`: its examples scored."""
        self._emit({"kind": "eval", "step": at.step, "epoch": at.epoch, "split": split, **scores,
                    "lr": self.stepper.lrs(), "time_s": self.clock(), "eval_s": round(eval_s, 3), "eval_n": eval_n})

    def examples(self, at: Position, split: str, rows: list[dict[str, Any]]) -> None:
        """An evaluation's decoded examples (none: nothing is written), to the sinks that keep them."""
        if not rows:
            return
        for sink in self.sinks:
            keep = getattr(sink, "examples", None)  # optional: a user's own sink may not have it
            if keep is not None:
                keep(split, at.step, rows)

    def images(self, at: Position, images: dict[str, Path]) -> None:
        """An evaluation's image files by name (a GAN's samples), to the sinks that show them."""
        if not images:
            return
        for sink in self.sinks:
            show = getattr(sink, "images", None)  # optional, as `examples`
            if show is not None:
                show(at.step, images)

    def gen(self, probes: list[dict[str, Any]]) -> None:
        for record in probes:
            self._emit({"kind": "gen", **record})

    def close(self, status: str) -> None:
        for sink in self.sinks:
            sink.close(status)

    def _emit(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)


class Checkpoints:
    """The run's ckpt.pt: rewritten at each save, and only ever with finite weights."""

    def __init__(self, path: Path, main: bool, world: int, clock: Clock, last: int | None) -> None:
        self.path, self.main, self.world, self.clock = path, main, world, clock
        self.last = last  # the step ckpt.pt holds, for messages

    def save(self, stepper: Stepper, at: Position) -> None:
        if not params_finite(stepper.model):  # only ever keep a good checkpoint
            return
        rngs = parallel.gather(checkpoint.rng_state())  # every process's, to resume each one's stream
        if not self.main:
            return
        checkpoint.save(self.path, {
            **stepper.state_dict(),
            "step": at.step, "epoch": at.epoch, "batch_in_epoch": at.batch_in_epoch,
            "rng": rngs[0], "rng_ranks": rngs if self.world > 1 else None, "elapsed_s": self.clock(),
        })
        self.last = at.step

    def kept(self) -> str:
        """What a stopped run leaves to resume from, as it is."""
        if self.last is None:
            return "no checkpoint was written yet (the first comes at an epoch's end or trainer.ckpt_every)"
        return f"the last good checkpoint (step {self.last}) is kept"


def _write_summary(summary: dict[str, Any], run_dir: Path | None, records: Records) -> None:
    """summary.json into `run_dir` (process 0's; None elsewhere), then the sinks closed whatever happens."""
    try:
        if run_dir is not None:  # whole or not at all: a full disk keeps the previous summary.json
            atomic.write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    finally:
        records.close(summary["status"])


def _cause(err: BaseException) -> str:
    if isinstance(err, stop.Stopped):
        return f"stopped by {err.args[0]}"
    return "interrupted (Ctrl-C)" if isinstance(err, KeyboardInterrupt) else type(err).__name__


def _drop_records_after(run_dir: Path, step: int) -> None:
    """A killed run may have logged steps past its last checkpoint; the resumed run redoes
    them, so those records (and a line cut off by the kill) and predictions are dropped first."""
    for name in ("metrics.jsonl", "gen.jsonl"):
        path = run_dir / name
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of_json(line) <= step]
            path.write_text("".join(line + "\n" for line in kept))
    for name in ("metrics.csv", "gen.csv"):
        path = run_dir / name
        if path.exists():
            with path.open(newline="") as f:
                rows = list(csv.reader(f))
            if rows and "step" in rows[0]:
                col = rows[0].index("step")
                kept = [r for r in rows[1:] if len(r) == len(rows[0]) and r[col].isdigit() and int(r[col]) <= step]
                with path.open("w", newline="") as f:
                    csv.writer(f).writerows([rows[0], *kept])
    for path in (run_dir / PREDICTIONS).glob("*.jsonl"):
        later = re.fullmatch(r".+_step(\d+)\.jsonl", path.name)
        if later and int(later.group(1)) > step:
            path.unlink()


def _step_of_json(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf




def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
