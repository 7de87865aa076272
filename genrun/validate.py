"""Config checks that run before anything is built, so bad input fails in one line.

Each rule names a key, a predicate and the allowed values in words. Hydra already rejects
unknown groups, options and keys (`genrun.overrides` words its errors); these rules catch
values of the right key but wrong kind, and keys added with `+` that nothing would read.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable
from numbers import Real
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError

from genrun import CONF_DIR
from genrun.errors import UserError, did_you_mean
from genrun.parallel import world


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v in allowed


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _real(v: Any) -> bool:
    """A finite number: inf and nan pass `> 0` or `<= 1` checks, then wreck the run."""
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _points(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) >= 1 and all(_real(x) for x in v) and len(set(v)) == len(v)
            and any(x != 0 for x in v))


def _split_names(v: Any) -> bool:
    return isinstance(v, (list, tuple, ListConfig)) and len(v) >= 1 and all(isinstance(x, str) and x for x in v)


RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("seed", _int_at_least(0), "an integer >= 0"),
    ("trainer.epochs", _int_at_least(0), "an integer >= 0"),
    ("trainer.max_steps", _optional(_int_at_least(1)), "null or an integer >= 1"),
    ("trainer.batch_size", _int_at_least(1), "an integer >= 1"),
    ("trainer.grad_accum", _int_at_least(1), "an integer >= 1"),
    ("trainer.eval_batch_size", _optional(_int_at_least(1)), "null or an integer >= 1"),
    ("trainer.eval_every", _int_at_least(0), "an integer >= 0 (0: at epoch ends only)"),
    ("trainer.eval_epochs", _one_of(True, False), "true or false"),
    ("trainer.eval_splits", _optional(_split_names), "null (all) or a non-empty list of split names, e.g. [dev]"),
    ("trainer.eval_limit", _optional(_int_at_least(1)), "null (whole splits) or an integer >= 1"),
    ("trainer.log_every", _int_at_least(1), "an integer >= 1"),
    ("trainer.ckpt_every", _int_at_least(0), "an integer >= 0 (0: at epoch ends only)"),
    ("trainer.num_workers", lambda v: v == "auto" or _int_at_least(0)(v), "auto or an integer >= 0"),
    ("trainer.threads", _optional(_int_at_least(1)), "null (torch's default) or an integer >= 1"),
    ("trainer.device", _one_of("auto", "cpu", "cuda"), "auto, cpu or cuda"),
    ("trainer.devices", _int_at_least(1), "an integer >= 1"),
    ("trainer.ddp_find_unused", _one_of(True, False), "true or false"),
    ("trainer.precision", _one_of("fp32", "bf16", "fp16"), "fp32, bf16 or fp16"),
    ("trainer.progress", _one_of("auto", "on", "off", True, False), "auto, on or off"),
    ("trainer.average", _optional(lambda v: _real(v) and v >= 0),
     "null (the last iterate) or a finite number >= 0, e.g. 8"),
    ("optim.lr", lambda v: _real(v) and v > 0, "a finite number > 0"),
]

GEN_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("every", _int_at_least(1), "an integer >= 1"),
    ("smoothing", lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("points", _points, "a list of distinct finite numbers with at least one non-zero, e.g. [-1, 0, 1]"),
    ("min_r2", _optional(lambda v: _real(v) and v <= 1), "null or a finite number <= 1"),
    ("max_change", _optional(lambda v: _real(v) and v > 1), "null or a finite number > 1"),
    ("slope", _one_of(True, False), "true or false"),
    ("mode", _one_of("fit", "exact"), "fit or exact"),
    ("horizon", _one_of(None, "none", "linear", "cosine"), "none, linear or cosine"),
    ("init_search", _one_of(True, False), "true or false"),
    ("snapshot", _one_of("device", "cpu"), "device or cpu"),
    ("probe", _one_of("same", "next"), "same or next"),
    ("guard", lambda v: isinstance(v, bool) or _split_names(v),
     "true, false or a list of guard rules, e.g. [backtrack,cap,shrink,grow,concave,keep,fill] (all but recover)"),
    ("history_size", _optional(_int_at_least(1)), "null or an integer >= 1"),
]


def _check(key: str, value: Any, ok: Callable[[Any], bool], allowed: str) -> None:
    if not ok(value):
        shown = "null" if value is None else value
        raise UserError(f"{key}={shown} is invalid: must be {allowed}")


def validate(cfg: DictConfig) -> None:
    """Raise a one-line UserError naming the first bad key and its allowed values."""
    for key, ok, allowed in RULES:
        _check(key, OmegaConf.select(cfg, key), ok, allowed)
    if cfg.trainer.epochs == 0 and cfg.trainer.max_steps is None:
        raise UserError("trainer.epochs=0 with trainer.max_steps=null leaves nothing to train: set either >= 1")
    tc = cfg.trainer
    processes = max(tc.devices, world())  # world(): torchrun's processes
    if tc.batch_size % processes:
        raise UserError(f"trainer.batch_size={tc.batch_size} does not split over {processes} processes "
                        f"(trainer.devices or torchrun's): make it a multiple of {processes}")
    _check_trainer_keys(cfg)
    _check_arguments(cfg)
    _check_model_fits_task(cfg)
    _check_gen(cfg)
    _check_no_nan(cfg)


def _check_gen(cfg: DictConfig) -> None:
    """optim.gen: GeN's own settings, each with its allowed values."""
    gen = OmegaConf.to_container(cfg.optim.gen, resolve=True) if cfg.optim.get("gen") else None
    if not gen:
        return
    from genrun.gen import GeN

    known = set(inspect.signature(GeN).parameters) - {"optimizer", "total_steps", "model", "scaler"}
    for key in gen:
        if key not in known:
            raise UserError(f"optim.gen.{key} is not a GeN setting{did_you_mean(key, known, 'optim.gen.')} "
                            f"(settings: {', '.join(sorted(known))})")
    for key, ok, allowed in GEN_RULES:
        if key in gen:
            _check(f"optim.gen.{key}", gen[key], ok, allowed)
    if not gen.get("slope", True) and sum(x != 0 for x in gen.get("points", [-1, 0, 1])) < 2:
        raise UserError(f"optim.gen.points={gen.get('points', [-1, 0, 1])} with optim.gen.slope=false needs two "
                        "non-zero multipliers (the fit has two unknowns), e.g. [-1, 1, 2]")
    try:  # the settings' combinations, as GeN checks them, before any job of a sweep starts
        import torch

        GeN(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), **gen)
    except (TypeError, ValueError) as err:
        named = [k for k in gen if re.search(rf"\b{k}\b", str(err))] or list(gen)
        given = ", ".join(f"optim.gen.{k}={gen[k]}" for k in named)
        raise UserError(f"optim.gen: {err} (this run: {given})") from None


def _check_no_nan(cfg: DictConfig) -> None:
    """A NaN anywhere (optim.momentum=nan, ...) is never meant: it reaches a constructor or the
    weights and fails there in a traceback, or not at all. (inf can be meant: growth_rate: .inf.)"""
    def walk(node: Any, key: str) -> None:
        if isinstance(node, float) and math.isnan(node):
            raise UserError(f"{key}=nan is invalid: must be a number")
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, value in items:
            walk(value, f"{key}.{k}" if isinstance(k, str) else f"{key}[{k}]")

    for group in cfg:
        if group == "hydra":  # Hydra's own node, there when a callback validates
            continue
        node = cfg[group]
        try:
            walk(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | ListConfig) else node,
                 str(group))
        except InterpolationResolutionError:  # what builds the node will say what is wrong
            continue


def _check_trainer_keys(cfg: DictConfig) -> None:
    """`+trainer.max_epochs=3` composes (Hydra's own hint suggests the +) but the engine reads
    trainer keys by name and would ignore it: an unknown trainer key is an error."""
    known = set(OmegaConf.load(Path(CONF_DIR) / "trainer" / "default.yaml"))
    for key in cfg.trainer:
        if key not in known:
            raise UserError(f"trainer.{key} is not a trainer setting{did_you_mean(str(key), known, 'trainer.')} "
                            f"(settings: {', '.join(sorted(known))})")


def _takes(fn: Callable[..., Any]) -> set[str] | None:
    """Keyword names `fn` accepts; None when it takes **kwargs (anything goes)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _check_keys_taken(group: str, keys: list[str], fn: Callable[..., Any], what: str, skip: set[str]) -> None:
    takes = _takes(fn)
    if takes is None:
        return
    takes -= skip
    for key in keys:
        if key not in takes:
            raise UserError(f"{group}.{key} is not an argument of {what}{did_you_mean(key, takes, group + '.')} "
                            f"(it takes: {', '.join(sorted(takes)) or 'nothing'})")


def _check_arguments(cfg: DictConfig) -> None:
    """A key the target would not take fails here, in one line, before anything is built:
    instantiate would raise a TypeError mid-start, a schedule only at its first call."""
    from genrun.optim import META_KEYS, REGISTRY

    # each target must import (else one line, not a traceback) and take the keys it is given;
    # values: the arguments the engine passes itself. Task keys are not checked: a task's config
    # also holds keys for the model (num_classes, ...), which task classes take as **kwargs
    runtime = {"task": None, "model": set(), "sched": {"t", "total"},
               "logger": {"run_dir", "config", "group", "name", "resume"}}
    for group, skip in runtime.items():
        target = OmegaConf.select(cfg, f"{group}._target_")
        if target is None:
            continue
        found = _import_target(group, target)
        if skip is not None:
            keys = [str(k) for k in cfg[group] if not str(k).startswith("_")]
            _check_keys_taken(group, keys, found, target, skip)
    name = cfg.optim.get("name")
    if name not in REGISTRY:
        raise UserError(f"optim.name={name} is not a known optimizer{did_you_mean(str(name), REGISTRY, 'optim.name=')} "
                        f"(known: {', '.join(sorted(REGISTRY))})")
    try:
        factory = REGISTRY[name].constructor()
    except ImportError:
        return  # building it will say which package is missing
    keys = [str(k) for k in cfg.optim if k not in META_KEYS]
    _check_keys_taken("optim", keys, factory, REGISTRY[name].factory.replace(":", "."), {"params"})


def _import_target(group: str, target: str) -> Any:
    """The object `target` names, or a one-line UserError saying why it cannot be imported."""
    from hydra.utils import get_object

    quiet = logging.getLogger("hydra.utils")  # get_object logs its failure at ERROR before raising it
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return get_object(target)
    except Exception as err:  # Hydra wraps the reason in an ImportError of several lines
        why = next((line for line in str(err).splitlines()[1:] if line.strip()), str(err)).strip()
        raise UserError(f"{group}._target_={target} cannot be imported ({why}): install its package, "
                        "or put its folder on PYTHONPATH (e.g. PYTHONPATH=. genrun ...)") from None
    finally:
        quiet.setLevel(level)


def _check_model_fits_task(cfg: DictConfig) -> None:
    """A model sizes itself from task keys (`${task.num_classes}`, `${task.num_items}`, ...);
    a task without them was paired with a model made for another task family."""
    if cfg.get("model") is None:  # a task of the user's that names no default model
        fits = ", ".join(models_for(cfg.task)) or "none of genrun's"
        raise UserError(f"model: task={cfg.task.get('name', '?')} names no model; choose one with +model=NAME "
                        f"(models that fit this task: {fits}), or add '- /model@_global_.model: NAME' to the "
                        "defaults list of the task's YAML")
    try:
        OmegaConf.to_container(cfg.model, resolve=True)
    except InterpolationKeyError as err:
        missing = str(err).split("'")[1] if "'" in str(err) else str(err)
        model = cfg.model.get("_target_", "?").rsplit(".", 1)[-1]
        fits = ", ".join(models_for(cfg.task)) or "none"
        raise UserError(f"model ({model}) needs {missing}, which task={cfg.task.name} does not define; "
                        f"models that fit this task: {fits}") from None


def models_for(task: DictConfig) -> list[str]:
    """The options of the model group whose `${task.*}` keys this task defines."""
    return [path.stem for path in sorted((Path(CONF_DIR) / "model").glob("*.yaml"))
            if all(key in task for key in re.findall(r"\$\{task\.(\w+)\}", path.read_text()))]
