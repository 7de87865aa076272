"""Reading a sweep's runs (each job's resolved config, summary and logged records), and figure helpers."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from genrun.rundir import in_use


@dataclass
class Run:
    """One finished (or diverged) job of a sweep."""

    path: Path
    cfg: DictConfig
    summary: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be read, shared by a sweep's runs

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        """metrics.jsonl: train and eval records in order."""
        return _jsonl(self.path / "metrics.jsonl", self.notes)

    @cached_property
    def probes(self) -> list[dict[str, Any]]:
        """gen.jsonl: one record per GeN probe."""
        return _jsonl(self.path / "gen.jsonl", self.notes)

    @property
    def status(self) -> str:
        return self.summary.get("status", "unknown")

    def select(self, key: str, default: Any = None) -> Any:
        """A key of the resolved config, or `default` when absent, null or unresolvable."""
        try:
            value = OmegaConf.select(self.cfg, key, default=default)
        except Exception:  # an interpolation that cannot resolve outside its sweep
            return default
        return default if value is None else value

    @cached_property
    def choices(self) -> dict[str, str]:
        """The group options this run composed (Hydra's runtime choices), e.g. {"optim": "gen_sgd"}."""
        try:
            hydra = OmegaConf.load(self.path / ".hydra" / "hydra.yaml")
            return {str(k): str(v) for k, v in (OmegaConf.select(hydra, "hydra.runtime.choices") or {}).items()}
        except (OSError, ValueError, yaml.YAMLError):
            return {}

    def final(self, split: str = "test") -> dict[str, Any]:
        """summary.json's final metrics of `split` ({} if never evaluated)."""
        return (self.summary.get("final") or {}).get(split) or {}


def _jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The records of a JSONL file; a line cut off by a kill or a full disk is skipped and noted."""
    if not path.exists():
        return []
    records, broken = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record, broken = None, broken + 1
        if isinstance(record, dict):
            records.append(record)
    if broken:
        notes.append(f"skipped {broken} unreadable line(s) of {path}")
    return records


def load_runs(sweep_dir: Path, notes: list[str] | None = None) -> list[Run]:
    """Every run dir below `sweep_dir` (any depth) with .hydra/config.yaml and a readable summary.json.

    What is left out goes into `notes`, one line each: runs without a summary.json (killed, or still
    running), and runs whose files cannot be read (a truncated summary.json, say)."""
    notes = [] if notes is None else notes
    runs = []
    for run_dir in sorted(_run_dirs(Path(sweep_dir)), key=_natural):
        if not (run_dir / "summary.json").exists():
            state = "still running" if in_use(run_dir) else "no summary.json: killed, or stopped by a crash"
            notes.append(f"unfinished run {run_dir} ({state}); not in the tables")
            continue
        try:
            runs.append(_load_run(run_dir, notes))
        except (OSError, ValueError, yaml.YAMLError) as err:  # JSONDecodeError is a ValueError
            notes.append(f"skipped {run_dir}: {type(err).__name__} reading it ({str(err).splitlines()[0][:120]})")
    return runs


def _run_dirs(root: Path) -> list[Path]:
    """Dirs below `root` holding .hydra/config.yaml, through symbolic links too (a folder of links
    to the runs a user wants compared), each real dir once."""
    found, seen = [], set()
    for here, dirs, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link back up the tree, or a second link to the same run
            dirs[:] = []
            continue
        seen.add(real)
        if os.path.isfile(os.path.join(here, ".hydra", "config.yaml")):
            found.append(Path(here))
        dirs[:] = [d for d in dirs if d != ".hydra"]
    return found


def _load_run(run_dir: Path, notes: list[str]) -> Run:
    summary = json.loads((run_dir / "summary.json").read_text())
    if not isinstance(summary, dict):
        raise ValueError("summary.json does not hold an object")
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    return Run(run_dir, OmegaConf.load(run_dir / ".hydra" / "config.yaml"), summary, overrides, notes)


def _natural(path: Path) -> list[Any]:
    """Sort key that puts job 2 before job 10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(path))]


def train_series(run: Run, keys: tuple[str, ...]) -> list[tuple[int, tuple[Any, ...]]]:
    """``(step, (record[k] for k in keys))`` for each train record of `run` that has every key,
    in logged order (a value logged as null, e.g. a non-finite one, comes back as None)."""
    return [
        (int(rec["step"]), tuple(rec[k] for k in keys))
        for rec in run.records
        if rec.get("kind") == "train" and all(k in rec for k in keys)
    ]


def group_runs(runs: list[Run], key: Callable[[Run], Hashable | None],
               order: Sequence[Hashable]) -> dict[Any, list[Run]]:
    """Runs grouped by `key(run)` (None: not part of the table), groups in `order`, unknown keys last."""
    groups: dict[Any, list[Run]] = defaultdict(list)
    for run in runs:
        k = key(run)
        if k is not None:
            groups[k].append(run)
    rank = {k: i for i, k in enumerate(order)}
    return dict(sorted(groups.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def mean_spread(values: Sequence[float], digits: int) -> str:
    """``mean ±half-range`` of seeds' values (just the value for one seed; "n/a" for none)."""
    if not values:
        return "n/a"
    spread = f" ±{(max(values) - min(values)) / 2:.{digits}f}" if len(values) > 1 else ""
    return f"{sum(values) / len(values):.{digits}f}{spread}"


def write_report(out_dir: Path, stem: str, markdown: str, figure: Callable[[Path], Path]) -> list[Path]:
    """`<stem>.md` with `markdown`, and the figure `figure(path)` draws; both paths."""
    path = Path(out_dir) / f"{stem}.md"
    path.write_text(markdown)
    return [path, figure(Path(out_dir) / f"{stem}_curves.png")]


def lr_and_loss_figure(rows: dict[Any, list[Run]], labels: dict[Any, str], path: Path, *, lr_title: str,
                       loss_label: str, solid: Sequence[Any] | None = None) -> Path:
    """Two panels, the lr (log) and the training loss against the step, one line per row from
    its first run; rows in `solid` are drawn solid and the others dashed (None: all solid)."""
    plt = pyplot()
    fig, (ax_lr, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for row, members in rows.items():
        series = train_series(members[0], ("lr", "loss"))
        steps = [step for step, _ in series]
        style = "-" if solid is None or row in solid else "--"
        ax_lr.plot(steps, [values[0][0] for _, values in series], style, label=labels.get(row, row))
        ax_loss.plot(steps, [values[1] for _, values in series], style, label=labels.get(row, row))
    ax_lr.set(yscale="log", xlabel="step", ylabel="learning rate", title=lr_title)
    ax_loss.set(yscale="log", xlabel="step", ylabel=loss_label, title="loss")
    ax_loss.legend(fontsize=8)
    return save_figure(fig, path)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (reports run on headless machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write and close `fig`; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
