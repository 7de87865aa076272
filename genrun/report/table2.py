"""Table 2 of the paper from a `+experiment=table2` or `table2_offline` sweep, and Figure 8-style curves.

A run belongs to Table 2 when its config has `table2.row` (set by the row bundles in
conf/experiment/table2_row/). The table has one row per optimizer and one column per data set:
our test accuracy (%), with the paper's number in parentheses where the data set is one of the
paper's (from PAPER below, copied from the paper's Table 2). Each half (the SGD rows, the
AdamW rows; they train different models) marks its best accuracy per column in bold. A run
that diverged is shown as "diverged", never dropped; one that finished at chance accuracy (a dead
network: finite loss, one class for everything) is counted in the mean and flagged beside it.

Cells:
- plain SGD/AdamW rows: the best accuracy over the lr variants run for that schedule
  (`<row>`, `<row>_lo`, `<row>_hi`): the best grid-tuned schedule; the lr that won is listed;
- GeN rows: the run from the default η0 (variant "default"); other starting lrs appear in
  the "starting lr" check, which compares the ends of the range (paper C.4.1);
- several seeds of one (data set, row, variant) are averaged.

Figures (one PNG per data set): lr against step and test accuracy against step, for each half,
from metrics.jsonl (for Prodigy, D-Adaptation and DoG the lr there is their adapted step).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from statistics import mean

from genrun.report.runs import Run, pyplot, save_figure
from genrun.tasks.base import at_chance

# The paper's Table 2 (test accuracy, %), columns in DATASETS order.
DATASETS = ["cifar10", "cifar100", "food101", "gtsrb", "svhn", "places365", "inat2021"]
PAPER: dict[str, list[float]] = {
    "gen_sgd": [96.76, 84.77, 82.43, 97.96, 97.02, 54.24, 44.57],
    "sgd_constant": [95.91, 81.64, 74.24, 95.20, 95.08, 51.09, 33.80],
    "sgd_linear": [95.52, 81.67, 75.14, 95.33, 95.34, 50.95, 30.69],
    "sgd_cosine": [95.82, 80.71, 76.39, 95.20, 95.27, 51.15, 31.10],
    "prodigy_sgd_row": [95.17, 80.39, 80.74, 97.80, 96.23, 50.33, 33.77],
    "dadapt_sgd": [95.20, 80.95, 80.50, 97.38, 95.32, 47.24, 38.00],
    "gen_adamw": [98.68, 92.62, 90.48, 99.06, 97.14, 59.80, 66.28],
    "adamw_constant": [97.49, 89.23, 88.44, 98.54, 96.65, 58.28, 65.62],
    "adamw_linear": [98.48, 92.60, 90.54, 98.74, 97.08, 58.52, 65.43],
    "adamw_cosine": [98.73, 92.71, 90.46, 98.77, 97.16, 58.19, 67.04],
    "prodigy": [98.92, 92.49, 90.42, 98.88, 97.13, 57.24, 62.61],
    "dadapt_adamw": [97.56, 88.11, 89.45, 99.04, 96.77, 56.19, 66.52],
}
# Row order and labels; the half is the row family (its base optimizer and model).
ROWS: list[tuple[str, str, str]] = [
    ("gen_sgd", "GeN-SGD", "sgd"),
    ("sgd_constant", "SGD(constant)", "sgd"),
    ("sgd_linear", "SGD(linear decay)", "sgd"),
    ("sgd_cosine", "SGD(cosine decay)", "sgd"),
    ("prodigy_sgd_row", "Prodigy", "sgd"),
    ("dadapt_sgd", "D-adapt SGD", "sgd"),
    ("sf_sgd", "Schedule-Free SGD †", "sgd"),
    ("gen_adamw", "GeN-AdamW", "adamw"),
    ("adamw_constant", "AdamW(constant)", "adamw"),
    ("adamw_linear", "AdamW(linear decay)", "adamw"),
    ("adamw_cosine", "AdamW(cosine decay)", "adamw"),
    ("prodigy", "Prodigy", "adamw"),
    ("dadapt_adamw", "D-adapt AdamW", "adamw"),
    ("sf_adamw", "Schedule-Free AdamW †", "adamw"),
    ("dog", "DoG †", "adamw"),
]
LABEL = {row: label for row, label, _ in ROWS}
GRID_ROWS = {"sgd": ["sgd_constant", "sgd_linear", "sgd_cosine"],
             "adamw": ["adamw_constant", "adamw_linear", "adamw_cosine"]}
GEN_ROWS = {"sgd": "gen_sgd", "adamw": "gen_adamw"}


def applies(runs: list[Run]) -> bool:
    return any(run.select("table2.row") for run in runs)


class Cell:
    """The runs of one (data set, row, lr variant): accuracy averaged over seeds, or diverged."""

    def __init__(self, runs: list[Run]):
        self.runs = runs
        finished = [r for r in runs if r.status == "finished" and _acc(r) is not None]
        self.acc = mean(_acc(r) for r in finished) if finished else None
        self.diverged_seeds = sum(r.status == "diverged" for r in runs)
        self.diverged = self.acc is None and self.diverged_seeds > 0
        self.chance_seeds = sum(_at_chance(r) for r in finished)
        self.lr = runs[0].select("optim.lr")
        self.seeds = len(runs)

    def text(self) -> str:
        if self.acc is None:
            return "diverged" if self.diverged else "n/a"
        # a mean over the seeds that finished must not hide the ones that did not
        lost = f" ({self.diverged_seeds}/{self.seeds} diverged)" if self.diverged_seeds else ""
        dead = f" ({self.chance_seeds}/{self.seeds} at chance)" if self.chance_seeds else ""
        return f"{self.acc:.2f}{lost}{dead}"


def _acc(run: Run) -> float | None:
    value = run.final("test").get("acc")
    return 100.0 * value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _at_chance(run: Run) -> bool:
    """A finished run with a dead network (the rule the engine's warning uses too)."""
    classes, acc = run.select("task.num_classes"), _acc(run)
    return isinstance(classes, int) and acc is not None and at_chance(acc / 100.0, classes)


def collect(runs: list[Run]) -> dict[tuple[str, str], dict[str, Cell]]:
    """(data set, row) -> {lr variant: Cell}."""
    grouped: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for run in runs:
        row = run.select("table2.row")
        if not row:
            continue
        task = run.select("task.name", "?")
        grouped[(task, row, run.select("table2.lr_variant", "default"))].append(run)
    cells: dict[tuple[str, str], dict[str, Cell]] = defaultdict(dict)
    for (task, row, variant), members in grouped.items():
        cells[(task, row)][variant] = Cell(members)
    return cells


def table_cell(variants: dict[str, Cell], row: str) -> tuple[Cell, str]:
    """The cell shown for a row, and a note on which lr variant it is."""
    if row in sum(GRID_ROWS.values(), []):
        scored = [(c.acc, name, c) for name, c in variants.items() if c.acc is not None]
        if scored:
            _, name, cell = max(scored, key=lambda t: t[0])
            return cell, f"best of {len(variants)} lrs: {cell.lr:g}" if len(variants) > 1 else f"lr {cell.lr:g}"
        return next(iter(variants.values())), ""
    cell = variants.get("default") or next(iter(variants.values()))
    return cell, f"lr {cell.lr:g}" if isinstance(cell.lr, (int, float)) else ""


def _columns(cells: dict[tuple[str, str], dict[str, Cell]]) -> list[str]:
    tasks = {task for task, _ in cells}
    return [t for t in DATASETS if t in tasks] + sorted(tasks - set(DATASETS))


def render_markdown(cells: dict[tuple[str, str], dict[str, Cell]]) -> str:
    columns = _columns(cells)
    rows = [r for r in ROWS if any((t, r[0]) in cells for t in columns)]
    rows += [(r, r, "other") for r in sorted({row for _, row in cells} - {r[0] for r in ROWS})]
    shown = {(t, r): table_cell(cells[(t, r)], r) for t in columns for r, _, _ in rows if (t, r) in cells}
    best: dict[tuple[str, str], float] = {}
    for (task, row), (cell, _) in shown.items():
        half = next((h for r, _, h in rows if r == row), "other")
        if cell.acc is not None:
            best[(task, half)] = max(best.get((task, half), -1.0), cell.acc)

    lines = [
        "# Table 2: test accuracy (%)",
        "",
        "Ours, with the paper's Table 2 number in parentheses where the data set is one of the paper's. "
        "Bold: the best of its half (SGD rows / AdamW rows) in that column. "
        "Plain SGD/AdamW rows show their best lr of the grid that was run; † marks rows not in the paper.",
        *_seeds_line(cells),
        "",
        "| optimizer | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row, label, half in rows:
        out = []
        for task in columns:
            if (task, row) not in shown:
                out.append("")
                continue
            cell, _ = shown[(task, row)]
            text = cell.text()
            if cell.acc is not None and math.isclose(cell.acc, best[(task, half)]):
                text = f"**{text}**"
            if task in DATASETS and row in PAPER:
                text += f" ({PAPER[row][DATASETS.index(task)]:.2f})"
            out.append(text)
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    lines += ["", "Learning rates behind each cell:", ""]
    lines += ["| optimizer | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row, label, _ in rows:
        values = (shown[(t, row)][1] if (t, row) in shown else "" for t in columns)
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    checks = render_checks(cells, columns)
    if checks:
        lines += ["", *checks]
    return "\n".join(lines) + "\n"


def _seeds_line(cells: dict[tuple[str, str], dict[str, Cell]]) -> list[str]:
    counts = sorted({c.seeds for variants in cells.values() for c in variants.values()})
    if counts == [1]:
        return []
    return [f"Each cell is the mean over {' or '.join(map(str, counts))} seeds (of those that finished)."]


def render_checks(cells: dict[tuple[str, str], dict[str, Cell]], columns: list[str]) -> list[str]:
    """GeN against the best grid-tuned schedule (target: within 0.5 points), and GeN's
    accuracy from its lowest and highest starting lr (target: within 1 point, paper C.4.1)."""
    out = []
    for half, gen_row in GEN_ROWS.items():
        for task in columns:
            gen = cells.get((task, gen_row), {})
            default = gen.get("default")
            grid = [c for r in GRID_ROWS[half] for c in cells.get((task, r), {}).values() if c.acc is not None]
            if default is None or not grid:
                continue
            tuned = max(grid, key=lambda c: c.acc)
            gap = f"{default.acc - tuned.acc:+.2f}" if default.acc is not None else "diverged"
            ok = (default.acc is not None and not default.diverged_seeds and not default.chance_seeds
                  and default.acc >= tuned.acc - 0.5)
            starts = sorted((c for c in gen.values()), key=lambda c: c.lr)
            spread, spread_ok, lr_span = "", "", ""
            if len(starts) > 1:
                lo, hi = starts[0], starts[-1]
                lr_span = f"{lo.lr:g} .. {hi.lr:g} ({hi.lr / lo.lr:.0f}x)"
                if lo.acc is None or hi.acc is None:
                    spread, spread_ok = "diverged", "no"
                else:
                    spread = f"{abs(hi.acc - lo.acc):.2f}"
                    spread_ok = "yes" if abs(hi.acc - lo.acc) <= 1.0 else "no"
            out.append(
                f"| {task} | {LABEL[gen_row]} | {default.text()} "
                f"| {tuned.acc:.2f} ({_row_of(cells, task, tuned)}, lr {tuned.lr:g}) "
                f"| {gap} | {'yes' if ok else 'no'} | {lr_span} | {spread} | {spread_ok} |"
            )
    if not out:
        return []
    return [
        "## Checks: GeN against grid-tuned schedules, and GeN's starting lr",
        "",
        "| data set | optimizer | GeN (default η0) | best grid-tuned schedule | gap | within 0.5 "
        "| GeN starting lrs | acc spread | within 1 |",
        "|---|---|---|---|---|---|---|---|---|",
        *out,
    ]


def _row_of(cells, task: str, target: Cell) -> str:
    for (t, row), variants in cells.items():
        if t == task and any(c is target for c in variants.values()):
            return LABEL.get(row, row)
    return "?"


def _curves(run: Run) -> tuple[list[int], list[float], list[int], list[float]]:
    lr_steps, lrs, acc_steps, accs = [], [], [], []
    for record in run.records:
        if record.get("kind") == "train" and record.get("lr"):
            lr_steps.append(record["step"])
            lrs.append(record["lr"][0] if isinstance(record["lr"], list) else record["lr"])
        elif record.get("kind") == "eval" and record.get("split") == "test" and "acc" in record:
            acc_steps.append(record["step"])
            accs.append(100.0 * record["acc"])
    return lr_steps, lrs, acc_steps, accs


def render_figures(cells: dict[tuple[str, str], dict[str, Cell]], out_dir: Path) -> list[Path]:
    plt = pyplot()

    written = []
    for task in _columns(cells):
        halves = [h for h in ("sgd", "adamw") if any((task, r) in cells for r, _, hh in ROWS if hh == h)]
        if not halves:
            continue
        fig, axes = plt.subplots(len(halves), 2, figsize=(11, 3.6 * len(halves)), squeeze=False)
        for i, half in enumerate(halves):
            ax_lr, ax_acc = axes[i]
            for row, label, h in ROWS:
                if h != half or (task, row) not in cells:
                    continue
                cell, _ = table_cell(cells[(task, row)], row)
                lr_steps, lrs, acc_steps, accs = _curves(cell.runs[0])
                style = "-" if row.startswith("gen_") else "--"
                positive = [(s, v) for s, v in zip(lr_steps, lrs) if v > 0]  # log axis: a decay's final 0 is dropped
                if positive:
                    ax_lr.plot(*zip(*positive), style, label=label)
                if accs:
                    ax_acc.plot(acc_steps, accs, style + "o" if len(accs) < 30 else style, ms=3, label=label)
            ax_lr.set(yscale="log", xlabel="step", ylabel="learning rate", title=f"{task}: {half.upper()} half, lr")
            ax_acc.set(xlabel="step", ylabel="test accuracy (%)", title=f"{task}: {half.upper()} half, test accuracy")
            ax_acc.legend(fontsize=7)
        written.append(save_figure(fig, out_dir / f"table2_curves_{task}.png"))
    return written


def render(runs: list[Run], out_dir: Path) -> list[Path]:
    cells = collect(runs)
    path = Path(out_dir) / "table2.md"
    path.write_text(render_markdown(cells))
    return [path, *render_figures(cells, Path(out_dir))]
