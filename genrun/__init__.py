"""genrun: a Hydra-driven PyTorch experiment runner built around GeN (Bu & Xu, ICLR 2025).

`from genrun.gen import GeN` is the step-size module; `genrun` on the command line runs
experiments through one shared engine (`genrun.engine.train`).
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

__version__ = "0.1.0"

#: The Hydra config groups: the checkout's top-level conf/ (genrun/conf links to it), or the
#: copy a wheel carries inside the package.
CONF_DIR = str((Path(__file__).parent / "conf").resolve())

#: The libraries whose versions a run records (summary.json) and `genrun --version` prints.
LIBRARIES = ("torch", "torchvision", "hydra-core", "timm", "transformers")


def versions() -> dict[str, str]:
    """genrun's version (and git commit, in a checkout), Python's and the main libraries'.

    Read from package metadata, so asking costs no import of torch.
    """
    out = {"genrun": __version__}
    commit = source_commit()
    if commit:
        out["genrun_commit"] = commit
    out["python"] = platform.python_version()
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def source_commit() -> str | None:
    """The git commit genrun's source tree is at, `-dirty` with uncommitted changes to tracked
    files; None outside a git checkout (a wheel install, a machine without git)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if changed.stdout.strip() else "")


def version_line(program: str = "genrun") -> str:
    """`genrun 0.1.0 (commit ...); torch 2.14.1, ..., Python 3.11.7`: what a bug report needs."""
    info = versions()
    commit = f" (commit {info.pop('genrun_commit')})" if "genrun_commit" in info else ""
    head, python = info.pop("genrun"), info.pop("python")
    return f"{program} {head}{commit}; " + ", ".join(f"{k} {v}" for k, v in info.items()) + f", Python {python}"
