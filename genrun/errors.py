"""The one exception type that reaches the user as a single line instead of a traceback."""

from __future__ import annotations

import difflib
from typing import Any


class UserError(Exception):
    """Bad input the user can fix: a config value, a path, a checkpoint.

    The message is printed as one line (`genrun: error: <message>`) and the process exits
    with status 2. Say which key or path is wrong and how to fix it.
    """


class DataMissing(UserError):
    """A data set is not on disk where the task looked for it."""


class DataCorrupt(UserError):
    """A data file is there but cannot be read as its format says (truncated, damaged, foreign)."""


class AlreadyFinished(UserError):
    """`trainer.resume` of a run that has trained all its steps: nothing to do, and nothing was changed.
    Printed as one line, exit status 0."""


def as_user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`: itself, or the cause Hydra's `instantiate` wrapped it in."""
    if isinstance(err, UserError):
        return err
    return err.__cause__ if isinstance(err.__cause__, UserError) else None


def did_you_mean(key: str, known: Any, prefix: str = "") -> str:
    """`; did you mean <prefix>X?` for the closest of `known`, or nothing: for a message naming a typo."""
    close = difflib.get_close_matches(key, [str(k) for k in known], n=3, cutoff=0.6)
    # a name with a word added (max_epochs) means the one without it (epochs), even where another
    # name shares more letters (eval_epochs)
    words = set(key.split("_"))
    close.sort(key=lambda name: not set(name.split("_")) <= words)
    return f"; did you mean {prefix}{close[0]}?" if close else ""
