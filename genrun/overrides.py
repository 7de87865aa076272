"""Hydra's composition errors (a typo in a key, an option, the override syntax) as one line.

Hydra prints these over several lines and, for an unknown key, suggests appending it with
`+`, which composes but trains with the key ignored. `genrun` sets HYDRA_FULL_ERROR until
the job starts, so that Hydra raises them, and words them here: the override, what is wrong,
the closest valid name and where to see the rest. With HYDRA_FULL_ERROR=1 set by the user,
Hydra's own traceback is shown instead; a job's own errors are reported as Hydra always does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from genrun import CONF_DIR
from genrun.errors import did_you_mean

#: What `explain` words; anything else Hydra raises keeps its own report.
COMPOSITION_ERRORS = (ConfigCompositionException, MissingConfigException, OverrideParseException)

GRAMMAR = "https://hydra.cc/docs/1.2/advanced/override_grammar/basic"


def override_key(override: str) -> str:
    """The key an override sets: `+trainer.epochs=3` -> `trainer.epochs`, `~seed` -> `seed`."""
    return override.split("=", 1)[0].lstrip("+~")


def explain(err: Exception, overrides: Sequence[str]) -> str:
    """The one line `genrun: error: ...` prints for a composition error ``err``."""
    if isinstance(err, OverrideParseException):
        why = [line for line in str(err).splitlines()
               if line and not line.startswith(("See https://", "Error parsing override"))]
        return f"cannot read the override {err.override!r}: {'; '.join(why)} (syntax: {GRAMMAR})"
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return (f"{group}={option} is not an option of {group}{did_you_mean(option, err.options, group + '=')} "
                f"(options: {', '.join(err.options)})")
    text = str(err)
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown:
        return _unknown_key(unknown.group(1), err.__cause__, overrides)
    present = re.search(r"An item is already at '([^']+)'", text)
    if present:
        key = present.group(1)
        return f"{key} already exists: set it without the + ({key}=...), or with ++ to add-or-set"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _unknown_key(key: str, cause: BaseException | None, overrides: Sequence[str]) -> str:
    """`trainer.max_epochs`: no such key. Suggest a sibling from the config the user's group
    choices compose (the key may exist under another option, e.g. optim.gen with optim=sgd)."""
    if "." not in key and (Path(CONF_DIR) / key).is_dir():  # a group no default chose, e.g. model
        return (f"{key}: nothing in this config chose a {key} for the override to replace (a task of your "
                f"own that names no default {key}); add one with +{key}=NAME")
    full = getattr(cause, "full_key", None) or key
    parent, _, leaf = str(full).rpartition(".")
    where = f": it has no {full}" if full != key else ""
    node = _node(parent, [o for o in overrides if override_key(o) != key])
    hint = ""
    if node is not None and leaf not in node:  # else it exists, under other options than this job's
        hint = did_you_mean(leaf, node.keys(), f"{parent}." if parent else "")
    return f"{key} is not a key of this config{where}{hint} (`genrun --cfg job` prints every key)"


def _node(path: str, overrides: Sequence[str]) -> DictConfig | None:
    """The node at `path` of the config composed from the overrides that pick group options."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    # `-m` sweeps (a,b) and key overrides are left out: a suggestion needs only the groups
    choices = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0] and "," not in o]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg: Any = compose(config_name="config", overrides=choices, return_hydra_config=path.startswith("hydra"))
    except Exception:  # only a hint: no suggestion rather than a second error
        return None
    finally:
        GlobalHydra.instance().clear()
    node = OmegaConf.select(cfg, path) if path else cfg
    return node if isinstance(node, DictConfig) else None
