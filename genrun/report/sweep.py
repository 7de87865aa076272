"""Any sweep: one row per combination of the overrides that vary, when no paper table applies.

`genrun -m optim=sgd,gen_sgd sched=constant,cosine seed=0,1,2` gives four rows (optim × sched)
of three seeds each. Columns: how many seeds finished (and how many diverged or stopped), the
final metrics of the test split (else the split every run evaluated first), mean ± half the
range over the finished seeds, the final lr and the wall time. The figure draws the lr and the
training loss against the step for each row, from its first run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from genrun.report.runs import Run, group_runs, lr_and_loss_figure, mean_spread, write_report

#: Overrides that never tell runs apart in a table: the seed is what a row averages over.
UNCOMPARED = ("seed", "hydra", "trainer.progress", "trainer.resume", "trainer.threads")
MAX_METRICS = 8


def applies(runs: list[Run]) -> bool:
    return bool(runs)


def _settings(run: Run) -> dict[str, str]:
    pairs = (o.lstrip("+~").split("=", 1) for o in run.overrides if "=" in o)
    return {k: v for k, v in pairs if not k.startswith(UNCOMPARED)}


def setting(run: Run, key: str) -> str:
    """What `key` was in `run`: its override, else the group option it composed or the config's
    value (runs of different sweeps name different keys), else "-"."""
    given = _settings(run)
    if key in given:
        return given[key]
    if key in run.choices:
        return run.choices[key]
    value = run.select(key)
    return "-" if value is None else str(value)


def varying(runs: list[Run]) -> list[str]:
    """The override keys whose values differ between runs, in the order the runs name them."""
    keys = list(dict.fromkeys(k for r in runs for k in _settings(r)))
    return [k for k in keys if len({setting(r, k) for r in runs}) > 1]


def split_of(runs: list[Run]) -> str:
    """`test` when every evaluated run has it, else the first split they all share."""
    splits = [list(r.summary.get("final") or {}) for r in runs if r.summary.get("final")]
    if not splits:
        return "test"
    common = [s for s in splits[0] if all(s in other for other in splits)]
    return "test" if "test" in common else (common or splits[0])[0]


def collect(runs: list[Run], keys: list[str]) -> dict[str, list[Run]]:
    def label(run: Run) -> str:
        return ", ".join(f"{k}={setting(run, k)}" for k in keys) or "all runs"

    return group_runs(runs, label, [])


def render_markdown(rows: dict[str, list[Run]], split: str) -> str:
    members = [r for rs in rows.values() for r in rs]
    sweep = Path(os.path.commonpath([r.path for r in members]))
    metrics = list(dict.fromkeys(k for r in members for k, v in r.final(split).items() if isinstance(v, (int, float))))
    metrics = metrics[:MAX_METRICS]
    synthetic = any(str(r.select("task.name", "")).startswith("synthetic") for r in members)
    head = ["row", "seeds", *metrics, "final lr", "wall time (s)"]
    title = f"Run {sweep.name}" if len(members) == 1 else f"{len(members)} runs under {sweep}"
    lines = [f"# {title}" + (" (SYNTHETIC data)" if synthetic else ""), "",
             f"Split `{split}`, end of training; mean over finished seeds ± half the range.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in rows.items():
        done = [r for r in runs if r.status == "finished"]
        lines.append("| " + " | ".join([
            label, _seeds(runs, done), *(mean_spread([r.final(split)[m] for r in done if m in r.final(split)], 4)
                                         for m in metrics),
            _final_lr(done), mean_spread([r.summary.get("wall_time_s", 0.0) for r in runs], 1),
        ]) + " |")
    return "\n".join(lines) + "\n"


def _seeds(runs: list[Run], done: list[Run]) -> str:
    others: dict[str, int] = {}
    for run in runs:
        if run.status != "finished":
            others[run.status] = others.get(run.status, 0) + 1
    note = ", ".join(f"{n} {status}" for status, n in others.items())
    return f"{len(done)}" + (f" ({note})" if note else "")


def _final_lr(done: list[Run]) -> str:
    lrs: list[Any] = [r.summary["lr"][0] for r in done if r.summary.get("lr")]
    return "n/a" if not lrs else f"{sum(lrs) / len(lrs):.3g}"


def render(runs: list[Run], out_dir: Path) -> list[Path]:
    rows = collect(runs, varying(runs))
    markdown = render_markdown(rows, split_of(runs))
    labels = {label: label for label in rows}
    return write_report(out_dir, "sweep", markdown, lambda path: lr_and_loss_figure(
        rows, labels, path, lr_title="lr", loss_label="training loss"))
