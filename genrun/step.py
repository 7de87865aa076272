"""One optimizer step from a step's micro-batches: forward and backward over each, then the update.

`Stepper` holds what the update needs (the optimizer, GeN when the lr is GeN's, the schedule
otherwise, the GradScaler, the weight averager) so the engine's loop reads as "backward, check the
loss, step". It also owns their states for checkpoints, in the order a checkpoint lists them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from dog import PolynomialDecayAverager
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from torch import nn

from genrun import parallel
from genrun.errors import UserError
from genrun.gen import GeN
from genrun.optim import OptimSpec, build_optimizer
from genrun.runtime import autocast

log = logging.getLogger("genrun")

#: GeN accepting fewer than this share of at least GEN_IDLE_PROBES probes gets a warning.
GEN_IDLE_SHARE, GEN_IDLE_PROBES = 0.1, 20


class Stepper:
    """Gradient accumulation, the update (the base optimizer's or GeN's), and what follows it."""

    def __init__(self, task: Any, model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer,
                 spec: OptimSpec, *, scaler: torch.amp.GradScaler, gen: GeN | None,
                 schedule: torch.optim.lr_scheduler.LRScheduler | None,
                 averager: PolynomialDecayAverager | None, amp: Callable[[], Any]) -> None:
        self.task, self.model, self.train_model = task, model, train_model
        self.optimizer, self.spec, self.scaler, self.gen = optimizer, spec, scaler, gen
        self.schedule, self.averager, self.amp = schedule, averager, amp
        # evaluate x̄_t, polynomial-decay averaged weights, rather than the last iterate (DoG's authors ask for it)
        self.eval_model = averager.averaged_model if averager is not None else model
        self._loss: torch.Tensor | float = 0.0

    @classmethod
    def build(cls, cfg: DictConfig, task: Any, model: nn.Module, train_model: nn.Module, device: torch.device,
              total_steps: int, world: int) -> Stepper:
        """The optimizer (GeN-wrapped or not), schedule, precision and averager that `cfg` asks for."""
        tc = cfg.trainer
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
            log.warning("sched=%s is ignored: GeN sets the lr (use optim.gen.horizon=linear|cosine)",
                        cfg.sched._target_.rsplit(".", 1)[-1])
        averager = PolynomialDecayAverager(model, gamma=float(tc.average)) if tc.get("average") is not None else None
        return cls(task, model, train_model, optimizer, spec, scaler=scaler, gen=gen, schedule=schedule,
                   averager=averager, amp=partial(autocast, device, tc.precision))

    def backward(self, micro: list[Any]) -> float:
        """Accumulate the gradient of the mean loss over `micro`; return that loss, the same number on
        every process (so all decide alike whether the run diverged)."""
        self.model.train()
        if self.spec.has_modes:
            self.optimizer.train()
        if self.gen is not None and self.gen.will_probe:
            self.gen.remember_rng()
        loss = 0.0
        for i, batch in enumerate(micro):
            with parallel.no_sync(self.train_model, last=i == len(micro) - 1):
                with self.amp():
                    micro_loss = self.task.loss(self.train_model, batch) / len(micro)
                self.scaler.scale(micro_loss).backward(create_graph=self.spec.create_graph)
            loss += micro_loss.detach()
        self._loss = loss
        return float(parallel.mean(loss))

    def step(self, micro: list[Any]) -> None:
        """The update from the gradient `backward(micro)` accumulated, then the gradient cleared."""
        if self.gen is not None:
            self.gen.step(partial(_mean_loss, self.task, self.train_model, micro, self.amp), loss=self._loss)
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.schedule is not None:
            self.schedule.step()
        if self.averager is not None:
            self.averager.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lrs(self) -> list[float]:
        return [self.spec.lr_of(group) for group in self.optimizer.param_groups]

    def evaluating(self) -> nn.Module:
        """The model to evaluate, switched (with an optimizer that has modes) to evaluation."""
        self.eval_model.eval()
        if self.spec.has_modes:
            self.optimizer.eval()
        return self.eval_model

    def gen_records(self) -> list[dict[str, Any]]:
        """GeN's probe records not yet logged (at most one a step; history keeps the latest ones)."""
        return self.gen.fresh_records() if self.gen is not None else []

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "scaler": self.scaler.state_dict(),
            "gen": self.gen.state_dict() if self.gen is not None else None,
            "averager": self.averager.state_dict() if self.averager is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Restore from checkpoint `state`, or raise a one-line UserError naming `source`."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.schedule is not None:
                self.schedule.load_state_dict(state["schedule"])
            self.scaler.load_state_dict(state["scaler"])
            if self.gen is not None:
                self.gen.load_state_dict(state["gen"])
            if self.averager is not None:
                self.averager.load_state_dict(state["averager"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise UserError(f"trainer.resume: {source} does not fit this run's model/optimizer ({first}); "
                            "resume with the overrides the run was started with") from None

    def gen_summary(self) -> dict[str, Any] | None:
        gen = self.gen
        return None if gen is None else {"probes": gen.probes, "accepted": gen.accepted}

    def gen_idle(self) -> str | None:
        """A warning when GeN rejected nearly every probe: its lr then moved only by the guard's rules
        (or not at all), which nothing else in a finished run's output would show."""
        gen = self.gen
        if gen is None or gen.probes < GEN_IDLE_PROBES or gen.accepted >= GEN_IDLE_SHARE * gen.probes:
            return None
        reasons = Counter(r["reason"] for r in gen.history if not r["accepted"])
        why = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common(3))
        return (f"GeN accepted {gen.accepted} of {gen.probes} probes (latest rejections: {why}): it barely set the "
                "lr; gen.jsonl has each probe's losses and fit")


def _schedule_factor(sched: DictConfig, total_steps: int) -> Callable[[int], float]:
    """t -> lr multiplier from the `sched` config, as a plain partial: LambdaLR calls it every
    step, and Hydra's instantiated wrapper re-checks its target on each call (~0.3 ms)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(sched, resolve=True).items() if not k.startswith("_")}
    return partial(get_method(sched._target_), total=total_steps, **kwargs)


def _mean_loss(task: Any, model: nn.Module, micro: list[Any], amp: Callable[[], Any]) -> torch.Tensor:
    """GeN's closure: the loss over every micro-batch of this step, as the training forward saw it."""
    total = 0.0
    for batch in micro:
        with amp():
            total = total + task.loss(model, batch).float()
    return total / len(micro)
