"""The cross-family GeN suite (`+experiment=gen_suite`): gen_suite.md and its lr figure.

A run belongs to the suite when its config has `gen_suite.cell` and `gen_suite.row`
(conf/experiment/gen_suite_cell/, gen_suite_row/). Per cell: the headline metric of every row,
mean over seeds; the tuned best (the best mean over the constant and scheduled rows of the
cell's lr grid); and each GeN or peer row's score, its mean over the tuned best (for a loss to
minimise, the tuned best over its mean). A run collapsed when it diverged or ended no better
than the cell's `gen_suite.metric.collapsed` (chance, popularity, the starting objective).

GeN rows that ran with different settings (a sweep per setting, reported together) are told
apart by the overrides they differ in, e.g. `gen [optim.gen.overshoot=2]`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from genrun.report.runs import Run, pyplot, save_figure

GEN_ROWS = ("gen", "gen_div10", "gen_x10", "gen_div1000")
GATED = ("gen", "gen_div10", "gen_x10")  # gen_div1000 is reported, not gated
PEERS = ("prodigy", "sf")
START = {"gen": "η0", "gen_div10": "η0/10", "gen_x10": "10·η0", "gen_div1000": "η0/1000"}
TARGET = {"gen": 0.98, "gen_div10": 0.95, "gen_x10": 0.95}
#: Overrides that say where a run sits in the suite rather than how GeN was set.
PLACE = ("seed", "experiment", "+experiment", "hydra", "trainer.progress", "trainer.threads")


def applies(runs: list[Run]) -> bool:
    return any(run.select("gen_suite.cell") and run.select("gen_suite.row") for run in runs)


def variant(run: Run) -> str:
    """The overrides that set this run apart from the preset (empty for the preset itself)."""
    return ", ".join(sorted(o for o in run.overrides if not o.lstrip("+~").startswith(PLACE)))


def headline(run: Run) -> float | None:
    """The cell's headline metric of a finished run (None if it never evaluated)."""
    split, name = run.select("gen_suite.metric.split"), run.select("gen_suite.metric.name")
    value = run.final(split).get(name)
    return float(value) if value is not None and math.isfinite(value) else None


def collapsed(run: Run) -> bool:
    value = headline(run)
    if run.status != "finished" or value is None:
        return True
    limit, goal = float(run.select("gen_suite.metric.collapsed")), run.select("gen_suite.metric.goal")
    return value <= limit if goal == "max" else value >= limit


class Row:
    """One row of one cell: its runs (one per seed) and what they score."""

    def __init__(self, runs: list[Run]) -> None:
        self.runs = runs
        self.goal = runs[0].select("gen_suite.metric.goal", "max")
        self.collapsed = sum(collapsed(r) for r in runs)
        # a collapsed run counts with its value (or the collapse limit when it has none): a row
        # is not rescued by leaving its failures out
        values = [headline(r) for r in runs]
        limit = float(runs[0].select("gen_suite.metric.collapsed"))
        self.values = [limit if v is None else v for v in values]

    @property
    def mean(self) -> float:
        if self.goal == "min":  # objectives span decades: the geometric mean
            return math.exp(sum(math.log(max(v, 1e-300)) for v in self.values) / len(self.values))
        return sum(self.values) / len(self.values)

    def score(self, best: float) -> float:
        """GeN ÷ tuned best (tuned ÷ GeN for a loss): 1 matches the best tuned baseline."""
        if self.goal == "min":
            return max(best, 1e-300) / max(self.mean, 1e-300)
        return self.mean / best if best > 0 else math.nan

    def cell_text(self, digits: int) -> str:
        if self.goal == "min":
            text = f"{self.mean:.2e}"
        else:
            spread = (max(self.values) - min(self.values)) / 2
            text = f"{self.mean:.{digits}f} ±{spread:.{digits}f}" if len(self.values) > 1 else f"{self.mean:.{digits}f}"
        return text + (f" ({self.collapsed} collapsed)" if self.collapsed else "")


def collect(runs: list[Run]) -> dict[str, dict[str, Row]]:
    """cell -> row label -> Row, cells in the order first seen."""
    groups: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cell, row = run.select("gen_suite.cell"), run.select("gen_suite.row")
        if cell and row:
            label = row if row not in GEN_ROWS or not variant(run) else f"{row} [{variant(run)}]"
            groups[cell][label].append(run)
    return {cell: {label: Row(members) for label, members in rows.items()} for cell, rows in groups.items()}


def tuned_best(rows: dict[str, Row]) -> tuple[str, float] | None:
    """The best baseline row of the grid (constant or scheduled) and its mean."""
    base = {k: r for k, r in rows.items() if k.startswith(("const_", "sched_"))}
    if not base:
        return None
    pick = max if next(iter(base.values())).goal == "max" else min
    label = pick(base, key=lambda k: base[k].mean)
    return label, base[label].mean


def grid_note(rows: dict[str, Row], best: str) -> str:
    """Says so when the best lr sits at an end of the grid (the grid may be too narrow)."""
    index = best.split("_")[1]
    return ", at the grid's edge" if index in ("1", "4") else ""


def render_markdown(cells: dict[str, dict[str, Row]]) -> str:
    lines = ["# GeN across task families (gen_suite)", "",
             "Headline metric per cell, mean over seeds (± half the range; objectives: geometric mean). "
             "Score = row ÷ the best tuned baseline (for an objective: tuned ÷ row). "
             "Targets: GeN from η0 ≥ 0.98, from η0/10 and 10·η0 ≥ 0.95; η0/1000 is reported, not gated.", ""]
    gen_labels = sorted({k for rows in cells.values() for k in rows if k.split(" ")[0] in GEN_ROWS},
                        key=lambda k: (k.split(" ", 1)[1:] or [""], GEN_ROWS.index(k.split(" ")[0])))
    peer_labels = [p for p in PEERS if any(p in rows for rows in cells.values())]
    header = ["cell", "metric", "tuned best"] + [_title(k) for k in gen_labels] + list(peer_labels)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    worst: dict[str, tuple[float, str]] = {}
    total_collapsed = 0
    for cell, rows in cells.items():
        total_collapsed += sum(r.collapsed for k, r in rows.items() if k.split(" ")[0] in GEN_ROWS)
        tuned = tuned_best(rows)
        any_run = next(iter(rows.values())).runs[0]
        metric = f"{any_run.select('gen_suite.metric.split')} {any_run.select('gen_suite.metric.name')}"
        digits = 2 if any_run.select("gen_suite.metric.name") == "bleu" else 3
        row = [cell, metric, "n/a" if tuned is None else
               f"{rows[tuned[0]].cell_text(digits)} ({tuned[0]}{grid_note(rows, tuned[0])})"]
        for label in [*gen_labels, *peer_labels]:
            r = rows.get(label)
            if r is None:
                row.append("")
                continue
            if tuned is None:
                row.append(r.cell_text(digits))
                continue
            score = r.score(tuned[1])
            row.append(f"{r.cell_text(digits)} → **{score:.3f}**")
            if label in gen_labels and label.split(" ")[0] in GATED:
                if label not in worst or score < worst[label][0]:
                    worst[label] = (score, cell)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Worst cell per GeN row (target):", ""]
    for label, (score, cell) in worst.items():
        target = TARGET[label.split(" ")[0]]
        verdict = "met" if score >= target else f"missed by {target - score:.3f}"
        lines.append(f"- {_title(label)}: {score:.3f} on {cell} (target {target}: {verdict})")
    lines += ["", "Collapsed GeN runs (diverged, or at chance / popularity / the starting objective): "
                  f"{total_collapsed}."]
    return "\n".join(lines) + "\n"


def _title(label: str) -> str:
    base, _, rest = label.partition(" ")
    return f"GeN from {START.get(base, base)}" + (f" {rest}" if rest else "")


def figure(cells: dict[str, dict[str, Row]], path: Path) -> Path:
    """GeN's lr against the step, one panel per cell, one line per GeN row (first seed)."""
    plt = pyplot()
    n = len(cells)
    cols = min(n, 4)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.6 * cols, 2.8 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, (cell, rows) in zip(axes.flat, cells.items()):
        for label, row in rows.items():
            if label.split(" ")[0] not in GEN_ROWS:
                continue
            series = [(rec["step"], rec["lr"][0]) for rec in row.runs[0].records
                      if rec.get("kind") == "train" and rec.get("lr")]
            if series:
                ax.plot(*zip(*series), label=_title(label), lw=1)
        ax.set(yscale="log", title=cell, xlabel="step")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].set_ylabel("lr")
    axes.flat[0].legend(fontsize=6)
    return save_figure(fig, path)


def render(runs: list[Run], out_dir: Path) -> list[Path]:
    cells = collect(runs)
    path = Path(out_dir) / "gen_suite.md"
    path.write_text(render_markdown(cells))
    return [path, figure(cells, Path(out_dir) / "gen_suite_lr.png")]


def scores(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """cell -> row label -> (mean, score, collapsed): the numbers of the table, for tests and tools."""
    out: dict[str, dict[str, Any]] = {}
    for cell, rows in collect(runs).items():
        tuned = tuned_best(rows)
        out[cell] = {label: (r.mean, r.score(tuned[1]) if tuned else math.nan, r.collapsed)
                     for label, r in rows.items()}
    return out
