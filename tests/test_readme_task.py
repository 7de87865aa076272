"""The README's "Your own task and model" example, as written: its files in a folder of the
user's, its command from that folder, and a trained model at the end."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

from conftest import GENRUN, PATIENCE, ROOT

HEADING = "## Your own task and model"


def example() -> tuple[dict[str, str], str]:
    """{file name: content} of the section's code blocks (each names its file in its first
    line), and its shell command."""
    text = (ROOT / "README.md").read_text()
    assert HEADING in text, f"README.md lost its {HEADING!r} section"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    files, command = {}, None
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        if lang == "bash":
            command = body.strip()
            continue
        first = body.splitlines()[0]
        files[re.match(r"# ([\w./]+)", first).group(1).rstrip(":")] = body
    assert command and set(files) == {"mytask.py", "myconf/task/wine.yaml", "myconf/model/mlp.yaml"}
    return files, command


def test_readme_task_and_model_train_from_the_users_folder(tmp_path):
    files, command = example()
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    words = shlex.split(command)
    env = {**os.environ, "WANDB_MODE": "offline"}
    while "=" in words[0]:  # leading VAR=value assignments, as the shell reads them
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "genrun"
    run = tmp_path / "run"
    proc = subprocess.run([str(GENRUN), *words[1:], "trainer.progress=off", f"hydra.run.dir={run}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=PATIENCE)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final"]["test"]["acc"] >= 0.9, summary["final"]
    config = (run / ".hydra" / "config.yaml").read_text()
    assert "_target_: mytask.Wine" in config and "_target_: mytask.mlp" in config
    # the same command without the folder on PYTHONPATH: one line that says so, and no run dir
    env.pop("PYTHONPATH")
    proc = subprocess.run([str(GENRUN), *words[1:], f"hydra.run.dir={tmp_path / 'lost'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=PATIENCE)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "genrun: error: task._target_=mytask.Wine cannot be imported (ModuleNotFoundError(\"No module named "
        "'mytask'\")): install its package, or put its folder on PYTHONPATH (e.g. PYTHONPATH=. genrun ...)"]
    assert not (tmp_path / "lost").exists()
