"""A wheel built from the checkout works outside it: configs inside the package, the commands,
a short run, a report, and a user's config folder on Hydra's search path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PATIENCE, ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the checkout (a build writes build/ and
    *.egg-info next to its sources) and installed without dependencies into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in ("genrun", "conf"):
        shutil.copytree(ROOT / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(source)],
                   check=True, capture_output=True, timeout=PATIENCE)
    wheel = next((tmp / "dist").glob("genrun-*.whl"))
    target = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=PATIENCE)
    return target


def run(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m <args>` with the installed wheel first on the path (the venv's editable
    install only supplies the dependencies), from a folder that is not the checkout."""
    env = {**os.environ, "PYTHONPATH": str(installed), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=PATIENCE)


def test_the_wheel_carries_every_config(installed):
    shipped = {p.relative_to(installed / "genrun" / "conf") for p in (installed / "genrun" / "conf").rglob("*.yaml")}
    assert shipped == {p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml")}


def test_the_installed_commands_run_outside_the_checkout(installed, tmp_path):
    where = run(installed, tmp_path, "genrun.cli", "--version")
    assert where.returncode == 0 and where.stdout.startswith("genrun 0.1.0;"), where.stderr
    assert "commit" not in where.stdout  # no checkout around the wheel's files
    assert run(installed, tmp_path, "genrun.cli", "--help").stdout.count("task: ") >= 1
    job = run(installed, tmp_path, "genrun.cli", "task=rosenbrock", "--cfg", "job")
    assert job.returncode == 0 and "genrun.tasks.synthetic.Point" in job.stdout, job.stderr

    proc = run(installed, tmp_path, "genrun.cli", "+experiment=fast", "trainer.progress=off",
               f"hydra.run.dir={tmp_path / 'runs' / 'a'}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "runs" / "a" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["run_dir"] == str(tmp_path / "runs" / "a")
    assert str(installed) in (tmp_path / "runs" / "a" / ".hydra" / "hydra.yaml").read_text()  # its configs

    report = run(installed, tmp_path, "genrun.report", str(tmp_path / "runs"))
    assert report.returncode == 0, report.stderr
    assert "acc" in (tmp_path / "runs" / "sweep.md").read_text()


@pytest.mark.parametrize("how", ["searchpath", "config-dir"])
def test_a_users_config_folder_still_composes_with_the_installed_configs(installed, tmp_path, how):
    mine = tmp_path / "myconf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "tiny.yaml").write_text("# @package _global_\ntrainer:\n  max_steps: 3\n")
    where = [f"hydra.searchpath=[file://{tmp_path / 'myconf'}]"] if how == "searchpath" else [
        "--config-dir", str(tmp_path / "myconf")]
    proc = run(installed, tmp_path, "genrun.cli", *where, "+experiment=tiny", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 3" in proc.stdout and "_target_: genrun.models.SmallCNN" in proc.stdout
