"""Optimizer registry: one table from a config name to how to build that optimizer.

Param groups are built once from the model: by default norms and biases get no weight decay
(the usual practice; set `optim.no_decay_norm_bias=false` to decay everything).
A GeN optimizer is its base optimizer wrapped by `genrun.gen.GeN`; its settings live
under `optim.gen`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class OptimSpec:
    """How to build one optimizer and what the engine must do for it.

    `factory`: "module:Class", imported only when used, so baselines from optional
    packages cost nothing until chosen.
    `create_graph`: backward must keep the graph (Hessian-diagonal methods such as AdaHessian).
    `has_modes`: the optimizer has train()/eval() modes the engine must switch (Schedule-Free).
    `step_size`: a param group's effective learning rate, what the logs call `lr`; the group's
    `lr` unless the optimizer adapts a step of its own (D-Adaptation, Prodigy, DoG), where `lr`
    is only a multiplier (1.0 by default) and the curves the paper compares are of the step.
    """

    factory: str
    create_graph: bool = False
    has_modes: bool = False
    step_size: Callable[[dict[str, Any]], float] | None = None

    def lr_of(self, group: dict[str, Any]) -> float:
        return float(self.step_size(group) if self.step_size is not None else group["lr"])

    def constructor(self) -> Callable[..., torch.optim.Optimizer]:
        """The optimizer class, imported now (ImportError when its package is missing)."""
        module, name = self.factory.split(":")
        return getattr(importlib.import_module(module), name)

    def build(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return self.constructor()(*args, **kwargs)


def d_times_lr(group: dict[str, Any]) -> float:
    """D-Adaptation and Prodigy: the step is lr·d, d their running estimate of ‖w0 - w*‖."""
    return float(group["lr"]) * float(group.get("d", 1.0))


def dog_eta(group: dict[str, Any]) -> float:
    """DoG: η = lr·r̄/√G, one value per group (the package keeps a copy per parameter);
    before the first step, the multiplier."""
    eta = group.get("eta")
    return float(eta[0]) if eta else float(group["lr"])


# Baselines come from their maintained packages; genrun wraps, never re-implements them.
REGISTRY: dict[str, OptimSpec] = {
    "sgd": OptimSpec("torch.optim:SGD"),
    "adam": OptimSpec("torch.optim:Adam"),
    "adamw": OptimSpec("torch.optim:AdamW"),
    "adagrad": OptimSpec("torch.optim:Adagrad"),
    "rmsprop": OptimSpec("torch.optim:RMSprop"),
    "adafactor": OptimSpec("torch.optim:Adafactor"),
    "lion": OptimSpec("pytorch_optimizer:Lion"),
    "adabelief": OptimSpec("pytorch_optimizer:AdaBelief"),
    "adahessian": OptimSpec("pytorch_optimizer:AdaHessian", create_graph=True),
    "prodigy": OptimSpec("prodigyopt:Prodigy", step_size=d_times_lr),
    "dadapt_sgd": OptimSpec("dadaptation:DAdaptSGD", step_size=d_times_lr),
    "dadapt_adam": OptimSpec("dadaptation:DAdaptAdam", step_size=d_times_lr),
    "sf_sgd": OptimSpec("schedulefree:SGDScheduleFree", has_modes=True),
    "sf_adamw": OptimSpec("schedulefree:AdamWScheduleFree", has_modes=True),
    "dog": OptimSpec("dog:DoG", step_size=dog_eta),
}

# Keys of an optim config that are not constructor arguments of the optimizer.
META_KEYS = {"name", "lr", "gen", "no_decay_norm_bias"}


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict[str, Any]]:
    """Trainable parameters, split so 1-D tensors (norm weights, biases) skip weight decay."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not no_decay_norm_bias or weight_decay == 0:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: Any, model: nn.Module) -> tuple[torch.optim.Optimizer, OptimSpec]:
    """The base optimizer named by `cfg.name` over `model`'s trainable parameters.

    Every key of `cfg` other than name, lr, gen and no_decay_norm_bias is passed to the
    optimizer's constructor, so the YAML holds the defaults (conf/optim/*.yaml).
    """
    spec = REGISTRY[cfg["name"]]
    kwargs = {k: v for k, v in dict(cfg).items() if k not in META_KEYS}
    weight_decay = float(kwargs.pop("weight_decay", 0.0))
    groups = param_groups(model, weight_decay, bool(cfg.get("no_decay_norm_bias", True)))
    return spec.build(groups, lr=float(cfg["lr"]), **kwargs), spec
