"""Table 5 of the paper from a `+experiment=table5` sweep (or any sweep whose runs set `table5.row`).

One table row per row of conf/experiment/table5_row/ (`manual`: the tutorial's warm-up then
constant lr; `gen`: GeN-SGD): COCO AP, AP_s, AP_m and AP_l on the test split at the end of
training, for boxes (detection) and masks (segmentation), as mean ± standard deviation over
seeds, the way the paper reports them; the paper's numbers follow. A size class without test
objects is n/a (COCO's -1). A sweep on synthetic scenes says so in its title.

Figure: the lr and the training loss against the step for each row, from the first seed.
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean, stdev

from genrun.report.runs import Run, group_runs, lr_and_loss_figure, write_report

METRICS = ["ap", "ap_s", "ap_m", "ap_l"]
LABEL = {"manual": "manual (warm-up, then constant)", "gen": "GeN-SGD"}
# The paper's Table 5 (Mask R-CNN, ResNet-50, COCO-pretrained, Penn-Fudan): (mean, std) in METRICS order
PAPER = {
    "bbox": {"gen": [(0.805, 0.038), (0.452, 0.002), (0.624, 0.082), (0.813, 0.032)],
             "manual": [(0.802, 0.025), (0.368, 0.013), (0.586, 0.079), (0.819, 0.017)]},
    "segm": {"gen": [(0.771, 0.019), (0.432, 0.010), (0.518, 0.104), (0.781, 0.015)],
             "manual": [(0.768, 0.022), (0.388, 0.029), (0.455, 0.092), (0.783, 0.020)]},
}


def applies(runs: list[Run]) -> bool:
    return any(run.select("table5.row") for run in runs)


def collect(runs: list[Run]) -> dict[str, list[Run]]:
    return group_runs(runs, lambda run: run.select("table5.row"), list(LABEL))


def cell(members: list[Run], key: str) -> str:
    values = [r.final()[key] for r in members if r.status == "finished" and r.final().get(key, -1) >= 0]
    if not values:
        return "n/a"
    return f"{mean(values):.3f} ± {stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def render_markdown(rows: dict[str, list[Run]]) -> str:
    task = next(iter(rows.values()))[0].select("task.name", "?")
    title = f"Table 5: Mask R-CNN on {task}" + (" (SYNTHETIC data: not comparable to the paper)"
                                               if task.startswith("synthetic") else "")
    lines = [f"# {title}", "", "Test split, end of training; mean ± standard deviation over seeds.", ""]
    for iou, what in (("bbox", "Detection (boxes)"), ("segm", "Segmentation (masks)")):
        header = "| row | seeds | " + " | ".join(METRICS) + " |"
        lines += [f"## {what}", "", header, "|" + "---|" * (len(METRICS) + 2)]
        for row, members in rows.items():
            diverged = sum(r.status == "diverged" for r in members)
            seeds = f"{len(members)}" + (f" ({diverged} diverged)" if diverged else "")
            lines.append(f"| {LABEL.get(row, row)} | {seeds} | "
                         + " | ".join(cell(members, f"{iou}_{m}") for m in METRICS) + " |")
        lines += ["", "The paper (Penn-Fudan, COCO-pretrained ResNet-50):", "", header,
                  "|" + "---|" * (len(METRICS) + 2)]
        for row, values in PAPER[iou].items():
            lines.append(f"| {LABEL[row]} | | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in values) + " |")
        lines.append("")
    return "\n".join(lines)


def render_figure(rows: dict[str, list[Run]], path: Path) -> Path:
    return lr_and_loss_figure(rows, LABEL, path, lr_title="lr (Figure 10)", loss_label="training loss (sum of 5)")


def render(runs: list[Run], out_dir: Path) -> list[Path]:
    rows = collect(runs)
    return write_report(out_dir, "table5", render_markdown(rows), lambda path: render_figure(rows, path))
