"""Table 7 of the paper from a `+experiment=table7` or `table7_offline` sweep, and Figure 13-style curves.

A run belongs to Table 7 when its config has `table7.row` (conf/experiment/table7_row/). One
table row per (row, batch size): test Recall@k and NDCG@k at the end of training, averaged
over seeds, ± half their range when there are several; the paper's numbers follow
for reference (from PAPER, the paper's Table 7, MovieLens-1M). A sweep on the synthetic
sequences says so in its title: its numbers are not comparable to the paper's. A diverged run
is shown as diverged, and a finished one at chance is flagged beside the mean.

Figure: for each row, the lr (GeN's, or the constant one) against the epoch, and test
NDCG@10 and Recall@10 against the epoch, from the first seed's metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from genrun.report.runs import Run, group_runs, mean_spread, pyplot, save_figure, write_report

METRICS = ["recall@1", "recall@5", "recall@10", "recall@20", "ndcg@1", "ndcg@5", "ndcg@10", "ndcg@20"]
# The paper's Table 7 (BERT4Rec, MovieLens-1M, 100 epochs): row -> (batch, metrics in METRICS order).
PAPER: dict[str, tuple[int, list[float]]] = {
    "gen_large": (1024, [0.405, 0.720, 0.821, 0.900, 0.405, 0.575, 0.607, 0.627]),
    "constant_large": (1024, [0.374, 0.693, 0.796, 0.883, 0.374, 0.546, 0.580, 0.602]),
    "constant_small": (128, [0.397, 0.718, 0.820, 0.895, 0.397, 0.570, 0.603, 0.622]),
}
LABEL = {"gen_large": "GeN-Adam", "constant_large": "Adam (constant)", "constant_small": "Adam (constant)",
         "gen_small": "GeN-Adam †", "gen_large_next": "GeN-Adam, probing the next batch †"}
ORDER = ["gen_large", "constant_large", "constant_small", "gen_small", "gen_large_next"]


def applies(runs: list[Run]) -> bool:
    return any(run.select("table7.row") for run in runs)


def collect(runs: list[Run]) -> dict[str, list[Run]]:
    return group_runs(runs, lambda run: run.select("table7.row"), ORDER)


def cells(members: list[Run]) -> tuple[list[str], str]:
    """The metric cells of one row, and a note on seeds that diverged or finished at chance."""
    finished = [r for r in members if r.status == "finished" and all(m in r.final() for m in METRICS)]
    notes = []
    diverged = sum(r.status == "diverged" for r in members)
    if diverged:
        notes.append(f"{diverged} diverged")
    if any(r.summary.get("warning") for r in finished):
        notes.append(f"{sum(bool(r.summary.get('warning')) for r in finished)} at chance")
    note = f" ({', '.join(notes)})" if notes else ""
    if not finished:
        return ["n/a"] * len(METRICS), note
    return [mean_spread([r.final()[metric] for r in finished], 3) for metric in METRICS], note


def render_markdown(rows: dict[str, list[Run]]) -> str:
    first = next(iter(rows.values()))[0]
    task = first.select("task.name", "?")
    synthetic = task != "ml1m"
    title = f"Table 7: BERT4Rec on {task}" + (" (SYNTHETIC data: not comparable to the paper)" if synthetic else "")
    header = "| row | batch | seeds | " + " | ".join(METRICS) + " |"
    lines = [f"# {title}", "", "Test split, end of training; mean over seeds ± half the range.", "",
             header, "|" + "---|" * (len(METRICS) + 3)]
    for row, members in rows.items():
        batch = members[0].select("trainer.batch_size", "?")
        values, note = cells(members)
        lines.append(f"| {LABEL.get(row, row)} | {batch} | {len(members)}{note} | " + " | ".join(values) + " |")
    lines += ["", "The paper (MovieLens-1M, 100 epochs):", "", header, "|" + "---|" * (len(METRICS) + 3)]
    for row, (batch, values) in PAPER.items():
        lines.append(f"| {LABEL[row]} | {batch} | | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += ["", "† not in the paper: GeN at the small batch (the paper says GeN needs the larger one), and GeN "
              "probing the batch after the one that made the step (`optim.gen.probe=next`)."]
    return "\n".join(lines) + "\n"


def steps_per_epoch(run: Run) -> int | None:
    """The last step the run logged in its first epoch, if it got past it (None: it did not)."""
    train = [r for r in run.records if r.get("kind") == "train"]
    if not any(r.get("epoch", 0) >= 1 for r in train):
        return None
    return max(r["step"] for r in train if r.get("epoch", 0) == 0)


def _curves(run: Run, per_epoch: float) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """(x, lr) of train records; (x, NDCG@10, Recall@10) of test evaluations; x = step / per_epoch."""
    lr_x, lrs, ev_x, ndcg, recall = [], [], [], [], []
    for rec in run.records:
        if rec.get("kind") == "train" and rec.get("lr"):
            lr_x.append(rec["step"] / per_epoch)
            lrs.append(rec["lr"][0])
        elif rec.get("kind") == "eval" and rec.get("split") == "test" and "ndcg@10" in rec:
            ev_x.append(rec["step"] / per_epoch)
            ndcg.append(rec["ndcg@10"])
            recall.append(rec["recall@10"])
    return lr_x, lrs, ev_x, ndcg, recall


def render_figure(rows: dict[str, list[Run]], path: Path) -> Path:
    plt = pyplot()

    fig, (ax_lr, ax_ndcg, ax_recall) = plt.subplots(1, 3, figsize=(15, 3.8))
    # epochs when every drawn run got past its first one (trainer.max_steps may stop a run short of it)
    per_epoch = {row: steps_per_epoch(members[0]) for row, members in rows.items()}
    unit = "epoch" if all(per_epoch.values()) else "step"
    for row, members in rows.items():
        lr_x, lrs, ev_x, ndcg, recall = _curves(members[0], per_epoch[row] if unit == "epoch" else 1)
        label = f"{LABEL.get(row, row)} (B={members[0].select('trainer.batch_size', '?')})"
        style = "-" if row.startswith("gen") else "--"
        ax_lr.plot(lr_x, lrs, style, label=label)
        ax_ndcg.plot(ev_x, ndcg, style, label=label)
        ax_recall.plot(ev_x, recall, style, label=label)
    ax_lr.set(yscale="log", xlabel=unit, ylabel="learning rate", title="lr")
    ax_ndcg.set(xlabel=unit, ylabel="test NDCG@10", title="NDCG@10")
    ax_recall.set(xlabel=unit, ylabel="test Recall@10", title="Recall@10")
    ax_recall.legend(fontsize=7)
    return save_figure(fig, path)


def render(runs: list[Run], out_dir: Path) -> list[Path]:
    rows = collect(runs)
    return write_report(out_dir, "table7", render_markdown(rows), lambda path: render_figure(rows, path))
