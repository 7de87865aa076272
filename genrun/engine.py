"""The one training loop every task runs through.

Read it top to bottom: build the task, model, optimizer (GeN-wrapped or not) and schedule;
optionally restore a checkpoint; then for each optimizer step run the forward/backward over
`grad_accum` micro-batches, take the step, log, evaluate and checkpoint. The engine never
looks at a task's name: tasks are plug-ins behind `genrun.tasks.Task`. With
`trainer.devices > 1` this same loop runs in each data-parallel process (`genrun.parallel`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import torch
from dog import PolynomialDecayAverager
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from genrun import atomic, checkpoint, parallel, stop, versions
from genrun.errors import AlreadyFinished, UserError
from genrun.gen import GeN
from genrun.optim import build_optimizer
from genrun.runtime import (
    EpochBatches,
    autocast,
    loader_workers,
    params_finite,
    peak_memory_mb,
    pick_device,
    seed_everything,
    to_device,
)
from genrun.sinks import JsonlSink, build_sink

log = logging.getLogger("genrun")


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
    # the training forward goes through DDP; evaluation, metrics and checkpoints use the model itself
    train_model = parallel.wrap(model, device, tc.get("ddp_find_unused", False))
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
    eval_loaders = {  # private generators: evaluating must not move the training's random stream
        split: DataLoader(parallel.shard(data), batch_size=tc.eval_batch_size or tc.batch_size,
                          collate_fn=getattr(data, "collate", None), generator=torch.Generator().manual_seed(0),
                          **loading)
        for split, data in eval_sets.items()
    }

    # -- optimizer, GeN, schedule, precision ---------------------------------------------
    optimizer, spec = build_optimizer(cfg.optim, model)
    if spec.create_graph and world > 1:
        raise UserError(f"trainer.devices={world}: optim={cfg.optim.name} needs second derivatives, which DDP "
                        "does not all-reduce; train it with trainer.devices=1")
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    gen = None
    if cfg.optim.get("gen"):
        gen_kwargs = OmegaConf.to_container(cfg.optim.gen, resolve=True)
        gen = GeN(optimizer, **gen_kwargs, total_steps=total_steps, model=train_model,
                  scaler=scaler if scaler.is_enabled() else None)
    # GeN owns the lr, so a schedule would overwrite it; its T-dependent variant is optim.gen.horizon.
    schedule = None
    if gen is None:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule_factor(cfg.sched, total_steps))
    elif not cfg.sched._target_.endswith(".constant"):
        log.warning("sched=%s is ignored: GeN sets the lr (use optim.gen.horizon=linear|cosine)", cfg.sched._target_.rsplit(".", 1)[-1])
    amp = partial(autocast, device, tc.precision)
    # evaluate x̄_t, polynomial-decay averaged weights, rather than the last iterate (DoG's authors ask for it)
    averager = PolynomialDecayAverager(model, gamma=float(tc.average)) if tc.get("average") is not None else None
    eval_model = averager.averaged_model if averager is not None else model

    # -- resume ----------------------------------------------------------------------------
    step, epoch, batch_in_epoch = 0, 0, 0
    last_ckpt = resume["step"] if resume is not None else None  # the step ckpt.pt holds, for messages
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            if schedule is not None:
                schedule.load_state_dict(resume["schedule"])
            scaler.load_state_dict(resume["scaler"])
            if gen is not None:
                gen.load_state_dict(resume["gen"])
            if averager is not None:
                averager.load_state_dict(resume["averager"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise UserError(f"trainer.resume: {tc.resume} does not fit this run's model/optimizer ({first}); "
                            "resume with the overrides the run was started with") from None
        step, epoch, batch_in_epoch = resume["step"], resume["epoch"], resume["batch_in_epoch"]
        checkpoint.set_rng_state(checkpoint.rng_of(resume, rank, world))
        if main:
            _drop_records_after(run_dir, step)

    sinks = [JsonlSink(run_dir), build_sink(cfg.logger, run_dir, config=_plain(cfg), group=group, name=name,
                                             resume=resume is not None)] if main else []
    gen_logged = gen.probes if gen is not None else 0

    def emit(record: dict[str, Any]) -> None:
        for sink in sinks:
            sink.log(record)

    def lrs() -> list[float]:
        return [spec.lr_of(group) for group in optimizer.param_groups]

    def evaluate() -> dict[str, dict[str, float]]:
        eval_model.eval()
        if spec.has_modes:
            optimizer.eval()
        results = {}
        for split, loader in eval_loaders.items():
            with amp():  # each process predicts its share of the split; all score every share's part
                part = task.predict(eval_model, loader, partial(to_device, device=device))
            results[split] = task.score(parallel.parts(part, loader.dataset))
            emit({"kind": "eval", "step": step, "epoch": epoch, "split": split, **results[split], "lr": lrs()})
        return results

    def save_checkpoint() -> None:
        nonlocal last_ckpt
        if not params_finite(model):  # only ever keep a good checkpoint
            return
        rngs = parallel.gather(checkpoint.rng_state())  # every process's, to resume each one's stream
        if not main:
            return
        checkpoint.save(run_dir / checkpoint.FILENAME, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict() if schedule is not None else None,
            "scaler": scaler.state_dict(),
            "gen": gen.state_dict() if gen is not None else None,
            "averager": averager.state_dict() if averager is not None else None,
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "rng": rngs[0], "rng_ranks": rngs if world > 1 else None,
        })
        last_ckpt = step

    # -- the loop --------------------------------------------------------------------------
    status, message, results = "finished", None, {}
    bar = tqdm(total=total_steps, initial=step, disable=_progress_disabled(tc.progress) or not main,
               desc="train", unit="step")
    stop.defer(world == 1)  # one process: SIGTERM ends the current step first (several must stop in lockstep)
    try:
        while step < total_steps:
            sampler = EpochBatches(len(train_set), tc.batch_size, cfg.seed, epoch, start=batch_in_epoch * tc.grad_accum,
                                   rank=rank, world=world)
            if hasattr(train_set, "set_epoch"):  # PyTorch's convention for data that differs per epoch
                train_set.set_epoch(epoch)
            # a generator of its own: starting an iterator draws a worker seed, which from the global RNG
            # would shift every later draw (dropout, Cloze masks) between a resumed and an unbroken run
            loader_rng = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            batches = iter(DataLoader(train_set, batch_sampler=sampler, **loading,
                                      collate_fn=getattr(train_set, "collate", None), generator=loader_rng))

            def take() -> list:
                return [to_device(b, device) for _, b in zip(range(tc.grad_accum), batches)]

            micro = take()
            while step < total_steps and micro:
                model.train()
                if spec.has_modes:
                    optimizer.train()
                if gen is not None and gen.will_probe:
                    gen.remember_rng()
                loss = 0.0
                for i, batch in enumerate(micro):
                    with parallel.no_sync(train_model, last=i == len(micro) - 1):
                        with amp():
                            micro_loss = task.loss(train_model, batch) / len(micro)
                        scaler.scale(micro_loss).backward(create_graph=spec.create_graph)
                    loss += micro_loss.detach()
                loss_value = float(parallel.mean(loss))  # every process decides on the same number
                if not math.isfinite(loss_value):
                    status = "diverged"
                    message = f"loss is {loss_value} at step {step + 1}; {_kept(last_ckpt)}"
                    break

                if gen is not None:
                    gen.step(partial(_mean_loss, task, train_model, micro, amp), loss=loss)
                else:
                    scaler.step(optimizer)
                scaler.update()
                if schedule is not None:
                    schedule.step()
                if averager is not None:
                    averager.step()
                optimizer.zero_grad(set_to_none=True)
                step, batch_in_epoch = step + 1, batch_in_epoch + 1

                if step % tc.log_every == 0 or step == total_steps:
                    emit({"kind": "train", "step": step, "epoch": epoch, "split": "train", "loss": loss_value,
                          "lr": lrs(), **task.step_metrics(model)})
                if gen is not None:
                    # at most one new record per step, and history keeps the latest ones
                    for record in gen.new_records(gen_logged):
                        emit({"kind": "gen", **record})
                    gen_logged = gen.probes
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lrs()[0]:.3g}")
                ends_epoch = batch_in_epoch >= steps_per_epoch or step == total_steps  # evaluated below
                if tc.eval_every and step % tc.eval_every == 0 and not ends_epoch:
                    results = evaluate()
                if tc.ckpt_every and step % tc.ckpt_every == 0 and not ends_epoch:
                    save_checkpoint()
                if stop.pending() and step < total_steps:  # a stop signal: end here, with this step checkpointed
                    save_checkpoint()
                    stop.now()
                micro = take()
            if status != "finished":
                break
            if batch_in_epoch >= steps_per_epoch or step == total_steps:
                results = evaluate()
                if step < total_steps:
                    epoch, batch_in_epoch = epoch + 1, 0
                save_checkpoint()
    except BaseException as err:  # Ctrl-C, a crash: the run did not finish, whatever it had evaluated
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        message = f"{_cause(err)} after {step} steps; {_kept(last_ckpt)}"
        raise
    finally:
        stop.defer(False)
        bar.close()
        summary = {
            "status": status,
            "message": message,
            "step": step,
            "epoch": epoch,
            "total_steps": total_steps,
            "final": results,
            "warning": "; ".join(filter(None, (task.diagnose(results), _gen_idle(gen)))) or None
            if status == "finished" else None,
            "lr": lrs(),
            "gen": _gen_summary(gen),
            "wall_time_s": round(time.perf_counter() - started, 3),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "device": str(device),
            "devices": world,
            "run_dir": str(run_dir),
            "versions": software,
        }
        try:
            if main:  # whole or not at all: a full disk keeps the previous summary.json
                atomic.write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        finally:
            for sink in sinks:
                sink.close(status)
    return summary


def _kept(last_ckpt: int | None) -> str:
    """What a stopped run leaves to resume from, as it is."""
    if last_ckpt is None:
        return "no checkpoint was written yet (the first comes at an epoch's end or trainer.ckpt_every)"
    return f"the last good checkpoint (step {last_ckpt}) is kept"


def _cause(err: BaseException) -> str:
    if isinstance(err, stop.Stopped):
        return f"stopped by {err.args[0]}"
    return "interrupted (Ctrl-C)" if isinstance(err, KeyboardInterrupt) else type(err).__name__


def _schedule_factor(sched: DictConfig, total_steps: int):
    """t -> lr multiplier from the `sched` config, as a plain partial: LambdaLR calls it every
    step, and Hydra's instantiated wrapper re-checks its target on each call (~0.3 ms)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(sched, resolve=True).items() if not k.startswith("_")}
    return partial(get_method(sched._target_), total=total_steps, **kwargs)


def _mean_loss(task, model, micro, amp) -> torch.Tensor:
    """GeN's closure: the loss over every micro-batch of this step, as the training forward saw it."""
    total = 0.0
    for batch in micro:
        with amp():
            total = total + task.loss(model, batch).float()
    return total / len(micro)


#: GeN accepting fewer than this share of at least GEN_IDLE_PROBES probes gets a warning.
GEN_IDLE_SHARE, GEN_IDLE_PROBES = 0.1, 20


def _gen_idle(gen: GeN | None) -> str | None:
    """A warning when GeN rejected nearly every probe: its lr then moved only by the guard's rules
    (or not at all), which nothing else in a finished run's output would show."""
    if gen is None or gen.probes < GEN_IDLE_PROBES or gen.accepted >= GEN_IDLE_SHARE * gen.probes:
        return None
    reasons = Counter(r["reason"] for r in gen.history if not r["accepted"])
    why = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common(3))
    return (f"GeN accepted {gen.accepted} of {gen.probes} probes (latest rejections: {why}): it barely set the lr; "
            "gen.jsonl has each probe's losses and fit")


def _gen_summary(gen: GeN | None) -> dict[str, Any] | None:
    if gen is None:
        return None
    return {"probes": gen.probes, "accepted": gen.accepted}


def _drop_records_after(run_dir: Path, step: int) -> None:
    """A killed run may have logged steps past its last checkpoint; the resumed run redoes
    them, so those records (and a line cut off by the kill) are dropped first."""
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


def _step_of_json(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def _progress_disabled(progress: str | bool) -> bool | None:
    return {"auto": None, True: False, False: True, "on": False, "off": True}.get(progress, None)


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
