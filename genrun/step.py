"""One optimizer step from a step's micro-batches: forward and backward over each, then the update.

`Stepper` holds what the update needs (the optimizer, GeN when the lr is GeN's, the schedule
otherwise, the GradScaler, the weight averager) so the engine's loop reads as "backward, check the
loss, step". It also owns their states for checkpoints, in the order a checkpoint lists them.

A task with several objectives (`Task.objectives`: a GAN's discriminator, then its generator)
gets one `Player` each: its own optimizer, GeN and schedule over its own parameters, all built
from the same `cfg.optim`. They take turns within one step: `backward` accumulates and applies
every objective but the last (stopping at the first non-finite loss, before its update), `step`
applies the last, so the engine's "backward, check, step" loop is the same for one or several.
With several, checkpoints keep one optimizer / schedule / GeN state per objective, as a dict by
name under the usual keys; one objective keeps them as they were.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
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
from genrun.tasks.base import Objective

log = logging.getLogger("genrun")

#: GeN accepting fewer than this share of at least GEN_IDLE_PROBES probes gets a warning.
GEN_IDLE_SHARE, GEN_IDLE_PROBES = 0.1, 20


@dataclass
class Player:
    """One objective's update: its loss, optimizer, GeN (or None) and schedule (or None)."""

    name: str
    loss: Callable[[nn.Module, Any], torch.Tensor]
    optimizer: torch.optim.Optimizer
    gen: GeN | None
    schedule: torch.optim.lr_scheduler.LRScheduler | None


class Stepper:
    """Gradient accumulation, the update (the base optimizer's or GeN's), and what follows it."""

    def __init__(self, task: Any, model: nn.Module, train_model: nn.Module, players: list[Player],
                 spec: OptimSpec, *, scaler: torch.amp.GradScaler,
                 averager: PolynomialDecayAverager | None, amp: Callable[[], Any]) -> None:
        self.task, self.model, self.train_model = task, model, train_model
        self.players, self.spec, self.scaler = players, spec, scaler
        self.averager, self.amp = averager, amp
        # evaluate x̄_t, polynomial-decay averaged weights, rather than the last iterate (DoG's authors ask for it)
        self.eval_model = averager.averaged_model if averager is not None else model
        self._loss: torch.Tensor | float = 0.0
        self._losses: dict[str, float] = {}  # each objective's loss of the last step (several objectives)

    @classmethod
    def build(cls, cfg: DictConfig, task: Any, model: nn.Module, train_model: nn.Module, device: torch.device,
              total_steps: int, world: int) -> Stepper:
        """The optimizer (GeN-wrapped or not), schedule, precision and averager that `cfg` asks for:
        one optimizer over the model, or one per objective of the task."""
        tc = cfg.trainer
        objectives = task.objectives(model) or [Objective("", model, task.loss)]
        scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
        players, spec = [], None
        for objective in objectives:
            optimizer, spec = build_optimizer(cfg.optim, objective.module)
            players.append(Player(objective.name, objective.loss, optimizer,
                                  *_lr_setters(cfg, optimizer, train_model, scaler, total_steps)))
        if spec.create_graph and world > 1:
            raise UserError(f"trainer.devices={world}: optim={cfg.optim.name} needs second derivatives, which DDP "
                            "does not all-reduce; train it with trainer.devices=1")
        if players[0].gen is not None and not cfg.sched._target_.endswith(".constant"):
            log.warning("sched=%s is ignored: GeN sets the lr (use optim.gen.horizon=linear|cosine)",
                        cfg.sched._target_.rsplit(".", 1)[-1])
        averager = PolynomialDecayAverager(model, gamma=float(tc.average)) if tc.get("average") is not None else None
        return cls(task, model, train_model, players, spec, scaler=scaler, averager=averager,
                   amp=partial(autocast, device, tc.precision))

    def backward(self, micro: list[Any]) -> float:
        """Accumulate the gradient of the mean loss over `micro`; return that loss, the same number on
        every process (so all decide alike whether the run diverged). With several objectives, every
        one but the last is also applied here, in order (each next loss sees the updated weights), and
        the sum of their losses is returned, non-finite as soon as one is (then nothing more is done)."""
        self.model.train()
        for player in self.players:
            if self.spec.has_modes:
                player.optimizer.train()
        total = 0.0
        for player in self.players:
            loss = self._accumulate(player, micro)
            if len(self.players) == 1:
                return loss
            self._losses[player.name] = loss
            total += loss
            if not math.isfinite(loss) or player is self.players[-1]:
                return total
            self._update(player, micro)
        return total

    def _accumulate(self, player: Player, micro: list[Any]) -> float:
        if player.gen is not None and player.gen.will_probe:
            player.gen.remember_rng()  # this objective's probes replay its forward's draws (dropout, a GAN's noise)
        loss = 0.0
        for i, batch in enumerate(micro):
            with parallel.no_sync(self.train_model, last=i == len(micro) - 1):
                with self.amp():
                    micro_loss = player.loss(self.train_model, batch) / len(micro)
                self.scaler.scale(micro_loss).backward(create_graph=self.spec.create_graph)
            loss += micro_loss.detach()
        self._loss = loss
        return float(parallel.mean(loss))

    def step(self, micro: list[Any]) -> None:
        """The update from the gradient `backward(micro)` accumulated (the last objective's), then
        the gradient cleared."""
        self._update(self.players[-1], micro)
        self.scaler.update()
        if self.averager is not None:
            self.averager.step()

    def _update(self, player: Player, micro: list[Any]) -> None:
        if player.gen is not None:
            player.gen.step(partial(_mean_loss, player.loss, self.train_model, micro, self.amp), loss=self._loss)
        else:
            self.scaler.step(player.optimizer)
        if player.schedule is not None:
            player.schedule.step()
        player.optimizer.zero_grad(set_to_none=True)
        if len(self.players) > 1:  # a later objective's backward also reached this one's parameters (G's through D)
            self.model.zero_grad(set_to_none=True)

    def step_metrics(self) -> dict[str, float]:
        """`loss/<name>` and `lr/<name>` (param group 0's) of each objective, when there are several."""
        if len(self.players) == 1:
            return {}
        return {**{f"loss/{name}": loss for name, loss in self._losses.items()},
                **{f"lr/{p.name}": self.spec.lr_of(p.optimizer.param_groups[0]) for p in self.players}}

    def lrs(self) -> list[float]:
        """Every param group's lr, objective after objective."""
        return [self.spec.lr_of(group) for p in self.players for group in p.optimizer.param_groups]

    def evaluating(self) -> nn.Module:
        """The model to evaluate, switched (with an optimizer that has modes) to evaluation."""
        self.eval_model.eval()
        for player in self.players:
            if self.spec.has_modes:
                player.optimizer.eval()
        return self.eval_model

    def gen_records(self) -> list[dict[str, Any]]:
        """GeN's probe records not yet logged (at most one a step and objective; history keeps the
        latest ones), each tagged with its objective's `player` when there are several."""
        tag = len(self.players) > 1
        return [{**({"player": p.name} if tag else {}), **record}
                for p in self.players if p.gen is not None for record in p.gen.fresh_records()]

    def _per_player(self, state: Callable[[Player], Any]) -> Any:
        """`state(player)`, or with several objectives a dict of it by objective name."""
        if len(self.players) == 1:
            return state(self.players[0])
        return {p.name: state(p) for p in self.players}

    def _of_player(self, saved: Any, player: Player) -> Any:
        return saved if len(self.players) == 1 else saved[player.name]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self._per_player(lambda p: p.optimizer.state_dict()),
            "schedule": self._per_player(lambda p: p.schedule.state_dict() if p.schedule is not None else None),
            "scaler": self.scaler.state_dict(),
            "gen": self._per_player(lambda p: p.gen.state_dict() if p.gen is not None else None),
            "averager": self.averager.state_dict() if self.averager is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Restore from checkpoint `state`, or raise a one-line UserError naming `source`."""
        try:
            self.model.load_state_dict(state["model"])
            for p in self.players:
                p.optimizer.load_state_dict(self._of_player(state["optimizer"], p))
                if p.schedule is not None:
                    p.schedule.load_state_dict(self._of_player(state["schedule"], p))
                if p.gen is not None:
                    p.gen.load_state_dict(self._of_player(state["gen"], p))
            self.scaler.load_state_dict(state["scaler"])
            if self.averager is not None:
                self.averager.load_state_dict(state["averager"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise UserError(f"trainer.resume: {source} does not fit this run's model/optimizer ({first}); "
                            "resume with the overrides the run was started with") from None

    def gen_summary(self) -> dict[str, Any] | None:
        """GeN's probe counts; with several objectives, their totals and `players`, each one's."""
        gens = {p.name: p.gen for p in self.players if p.gen is not None}
        if not gens:
            return None
        counts = {name: {"probes": gen.probes, "accepted": gen.accepted} for name, gen in gens.items()}
        if len(self.players) == 1:
            return counts[""]
        return {"probes": sum(c["probes"] for c in counts.values()),
                "accepted": sum(c["accepted"] for c in counts.values()), "players": counts}

    def gen_idle(self) -> str | None:
        """A warning when GeN rejected nearly every probe: its lr then moved only by the guard's rules
        (or not at all), which nothing else in a finished run's output would show."""
        warnings = [_idle(p.gen, f"{p.name}'s " if p.name else "") for p in self.players if p.gen is not None]
        return "; ".join(filter(None, warnings)) or None


def _lr_setters(cfg: DictConfig, optimizer: torch.optim.Optimizer, train_model: nn.Module,
                scaler: torch.amp.GradScaler, total_steps: int) -> tuple[GeN | None, Any]:
    """GeN around `optimizer` when `cfg.optim` has one, else the schedule `cfg.sched` names.

    GeN owns the lr, so a schedule would overwrite it; its T-dependent variant is optim.gen.horizon."""
    if not cfg.optim.get("gen"):
        return None, torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule_factor(cfg.sched, total_steps))
    gen_kwargs = OmegaConf.to_container(cfg.optim.gen, resolve=True)
    return GeN(optimizer, **gen_kwargs, total_steps=total_steps, model=train_model,
               scaler=scaler if scaler.is_enabled() else None), None


def _idle(gen: GeN, whose: str) -> str | None:
    if gen.probes < GEN_IDLE_PROBES or gen.accepted >= GEN_IDLE_SHARE * gen.probes:
        return None
    reasons = Counter(r["reason"] for r in gen.history if not r["accepted"])
    why = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common(3))
    return (f"{whose}GeN accepted {gen.accepted} of {gen.probes} probes (latest rejections: {why}): it barely set "
            "the lr; gen.jsonl has each probe's losses and fit")


def _schedule_factor(sched: DictConfig, total_steps: int) -> Callable[[int], float]:
    """t -> lr multiplier from the `sched` config, as a plain partial: LambdaLR calls it every
    step, and Hydra's instantiated wrapper re-checks its target on each call (~0.3 ms)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(sched, resolve=True).items() if not k.startswith("_")}
    return partial(get_method(sched._target_), total=total_steps, **kwargs)


def _mean_loss(loss: Callable[[nn.Module, Any], torch.Tensor], model: nn.Module, micro: list[Any],
               amp: Callable[[], Any]) -> torch.Tensor:
    """GeN's closure: the loss over every micro-batch of this step, as the training forward saw it."""
    total = 0.0
    for batch in micro:
        with amp():
            total = total + loss(model, batch).float()
    return total / len(micro)
