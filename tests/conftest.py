"""Shared fixtures: composing configs without training, and running `genrun` as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
GENRUN = Path(sys.executable).with_name("genrun")

#: Seconds a subprocess, or a wait for what it writes, may take before a test calls it hung: a
#: safety net far above the slowest run's time on a machine busy with other work, never a
#: measure (no test asserts wall-clock time; a wait ends as soon as what it waits for is there).
PATIENCE = 1800


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory):
    """genrun's caches (token ids) in a scratch dir: tests never write to the user's home."""
    previous = os.environ.get("GENRUN_CACHE")
    os.environ["GENRUN_CACHE"] = str(tmp_path_factory.mktemp("genrun-cache"))
    yield
    if previous is None:
        os.environ.pop("GENRUN_CACHE", None)
    else:
        os.environ["GENRUN_CACHE"] = previous


def options(group: str) -> list[str]:
    """Every option of a config group: one YAML file each."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture
def compose_cfg():
    """compose(overrides) -> the composed config, exactly as `genrun` would see it."""

    def _compose(overrides: list[str] = ()):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)

    yield _compose
    GlobalHydra.instance().clear()


#: A user's file in every test's scratch dir: next to `hydra.run.dir=<tmp>/run`, above `outputs/...`.
USER_FILE = "notes-of-the-user.txt"


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: what must be the same after genrun gave up."""
    return {str(p.relative_to(root)): p.read_bytes() for p in files_under(root) if p.is_file()}


@pytest.fixture
def genrun(tmp_path):
    """Run the installed `genrun` in a scratch dir (not the repo) and return the finished process.

    Whatever a test asks of genrun, a file that existed before a call still exists after it: the
    scratch dir starts with a user's file in it, and every call is checked for removing anything."""
    (tmp_path / USER_FILE).write_text("mine\n")

    def _run(*args: str, timeout: float = PATIENCE, cwd: Path | None = None,
             python: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
        command = [str(GENRUN), *args] if python is None else [sys.executable, "-c", _patched(python), *args]
        before = files_under(tmp_path)
        proc = subprocess.run(command, cwd=cwd or tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        gone = sorted(str(p) for p in before - files_under(tmp_path))
        assert not gone, f"genrun {' '.join(args)} removed files that were there before it: {gone}"
        return proc

    yield _run
    assert (tmp_path / USER_FILE).read_text() == "mine\n"


def _patched(prelude: str) -> str:
    """`genrun` run after `prelude` (Python that patches genrun to inject a fault), its arguments
    taken from the command line."""
    return f"{prelude}\nimport sys\nfrom genrun.cli import main\nsys.argv[0] = 'genrun'\nmain()\n"


def scored_in_shares(task, model, data, count: int = 3, batch_size: int = 4, to_device=lambda b: b):
    """(`task.score` of `count` shares' predictions, as `count` processes make them; `task.evaluate`
    of the whole split in one process): data-parallel evaluation must give the second."""
    from torch.utils.data import DataLoader

    from genrun.parallel import Share

    def loader(d):
        return DataLoader(d, batch_size=batch_size, collate_fn=getattr(data, "collate", None))

    parts = [task.predict(model, loader(Share(data, i, count)), to_device) for i in range(count)]
    return task.score(parts), task.evaluate(model, loader(data), to_device)
