"""Files written whole or not at all: a full disk or a kill mid-write keeps the previous version.

Each write goes to `<name>.tmp` beside the file, is flushed to the disk (`fsync`: a full disk may only
say so then), and is renamed over the file; on any failure the temporary file is removed and the
error propagates, so no half-written `summary.json`, checkpoint or CSV replaces a good one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replace(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Make `path` hold what `write(file)` writes, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """`path.write_text(text)` (UTF-8), atomically."""
    replace(path, lambda f: f.write(text.encode("utf-8")))
