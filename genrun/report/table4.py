"""Table 4 of the paper from a `+experiment=table4` or `table4_offline` sweep, and the lr curves.

A run belongs to Table 4 when its config has `table4.row` (conf/experiment/table4_row/). One
table row per (fine-tuning method, row): GeN-AdamW, or AdamW with linear warm-up and decay.
One column per GLUE task with the paper's metric on the dev set (MNLI: the mean of matched
and mismatched accuracy; CoLA: Matthews correlation; MRPC, QQP: F1; STS-B: Pearson; others:
accuracy), in percent, averaged over seeds, ± half the range when there are several. A task
outside GLUE (the synthetic reviews) gets one accuracy column per evaluated split. The paper's
numbers follow (published baseline | GeN); a sweep on synthetic data says so in its title.

Figure: the lr against the step for each (method, row), from the first seed of the first task.
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from genrun.report.runs import Run, group_runs, mean_spread, pyplot, save_figure, write_report

METHODS = {"full": "FT", "bitfit": "BitFit", "lora": "LoRA"}
ROWS = {"warmup_linear": "AdamW, warm-up + linear decay", "gen": "GeN-AdamW",
        "gen_next": "GeN-AdamW, probing the next batch †"}
# The paper's Table 4 (RoBERTa-base, GLUE dev): method -> task -> (published, GeN)
PAPER_TASKS = ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte"]
PAPER: dict[str, list[tuple[float, float]]] = {
    "lora": [(87.5, 86.7), (95.1, 94.3), (90.8, 92.1), (63.4, 63.7), (93.3, 92.3), (85.3, 86.9), (86.6, 79.1)],
    "bitfit": [(85.0, 85.1), (93.7, 94.3), (92.0, 92.3), (61.8, 62.5), (91.3, 91.5), (84.2, 84.3), (77.8, 78.0)],
    "full": [(86.7, 86.8), (94.2, 94.7), (92.5, 92.3), (61.1, 64.8), (92.3, 91.9), (88.0, 88.4), (77.4, 80.5)],
}


def applies(runs: list[Run]) -> bool:
    return any(run.select("table4.row") for run in runs)


def scores(run: Run) -> dict[str, float]:
    """Column -> the run's final score in percent (the paper's metric for a GLUE task)."""
    from genrun.tasks.nlu import GLUE

    task = run.select("task.name", "?")
    final = run.summary.get("final") or {}
    if task == "mnli":
        accs = [final.get(split, {}).get("acc") for split in GLUE["mnli"].dev]
        return {"mnli": 100 * mean(accs)} if None not in accs else {}
    if task in GLUE:
        value = run.final("dev").get(GLUE[task].metrics[0])
        return {task: 100 * value} if value is not None else {}
    return {f"{task} {split}": 100 * metrics["acc"] for split, metrics in final.items() if "acc" in metrics}


def collect(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    def key(run: Run) -> tuple[str, str] | None:
        return (run.select("model.finetune", "full"), run.select("table4.row")) if run.select("table4.row") else None

    return group_runs(runs, key, [(m, r) for m in METHODS for r in ROWS])


def cell(members: list[Run], column: str) -> str:
    values = [scores(r)[column] for r in members if r.status == "finished" and column in scores(r)]
    diverged = sum(r.status == "diverged" and r.select("task.name") == column.split()[0] for r in members)
    note = f" ({diverged} diverged)" if diverged else ""
    return mean_spread(values, 1) + note


def render_markdown(rows: dict[tuple[str, str], list[Run]]) -> str:
    columns = sorted({c for members in rows.values() for r in members for c in scores(r)},
                     key=lambda c: (PAPER_TASKS.index(c) if c in PAPER_TASKS else len(PAPER_TASKS), c))
    tasks = {r.select("task.name", "?") for members in rows.values() for r in members}
    model = next(iter(rows.values()))[0].select("model.pretrained", "?")
    synthetic = any(not t or t.startswith("synthetic") for t in tasks)
    title = f"Table 4: {model} on {', '.join(sorted(tasks))}"
    title += " (SYNTHETIC data: not comparable to the paper)" if synthetic else ""
    header = "| method | row | seeds | " + " | ".join(columns) + " |"
    lines = [f"# {title}", "", "Dev split, end of training, in %; mean over seeds ± half the range.", "",
             header, "|" + "---|" * (len(columns) + 3)]
    for (method, row), members in rows.items():
        seeds = len({r.select("seed") for r in members})
        values = " | ".join(cell(members, c) for c in columns)
        lines.append(f"| {METHODS.get(method, method)} | {ROWS.get(row, row)} | {seeds} | {values} |")
    lines += ["", "The paper (RoBERTa-base, GLUE dev; published baseline | GeN):", "",
              "| method | " + " | ".join(PAPER_TASKS) + " |", "|" + "---|" * (len(PAPER_TASKS) + 1)]
    for method, pairs in PAPER.items():
        lines.append(f"| {METHODS[method]} | " + " | ".join(f"{a} \\| {b}" for a, b in pairs) + " |")
    if any(row == "gen_next" for _, row in rows):
        lines += ["", "† not in the paper: GeN probing the batch after the one that made the step "
                  "(`optim.gen.probe=next`)."]
    return "\n".join(lines) + "\n"


def render_figure(rows: dict[tuple[str, str], list[Run]], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    first_task = next(iter(rows.values()))[0].select("task.name")
    for (method, row), members in rows.items():
        run = next((r for r in members if r.select("task.name") == first_task), None)
        if run is None:
            continue
        # log axis: warm-up's 0 is off it
        points = [(rec["step"], rec["lr"][0]) for rec in run.records
                  if rec.get("kind") == "train" and rec.get("lr") and rec["lr"][0] > 0]
        style = {"gen": "-", "gen_next": ":"}.get(row, "--")
        ax.plot([s for s, _ in points], [lr for _, lr in points], style,
                label=f"{METHODS.get(method, method)}, {ROWS.get(row, row)}")
    ax.set(yscale="log", xlabel="step", ylabel="learning rate", title=f"lr on {first_task}")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def render(runs: list[Run], out_dir: Path) -> list[Path]:
    rows = collect(runs)
    return write_report(out_dir, "table4", render_markdown(rows), lambda path: render_figure(rows, path))
