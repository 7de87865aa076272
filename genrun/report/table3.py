"""Table 3 of the paper from a `+experiment=table3` or `table3_offline` sweep, and Figure 1's curves.

A run belongs to Table 3 when its config has `table3.row` (conf/experiment/table3_row/): GeN-AdamW,
or AdamW under one of Table 8's schedules. One table row per row: E2E's metrics of the texts
decoded on the test split at the end of training (BLEU, ROUGE-L, NIST, METEOR, CIDEr, the paper's
order) and the test perplexity, as mean ± half the range over seeds. The paper's numbers follow;
a sweep on synthetic data says so in its title.

Figure (Figure 1, right two; Figure 9): the lr and the training loss against the step for each
row, from the first seed.
"""

from __future__ import annotations

from pathlib import Path

from genrun.report.runs import Run, group_runs, lr_and_loss_figure, mean_spread, write_report

ROWS = {"gen": "GeN-AdamW", "linear": "linear decay", "cosine": "cosine decay", "constant": "constant",
        "invsqrt": "inverse sqrt (1/√t)", "inv": "inverse (1/t)"}
COLUMNS = {"bleu": ("BLEU", 2), "rouge_l": ("ROUGE-L", 2), "nist": ("NIST", 4), "meteor": ("METEOR", 4),
           "cider": ("CIDEr", 4), "ppl": ("ppl", 3)}
# The paper's Table 3 (GPT-2 + LoRA, E2E test), in COLUMNS order without ppl
PAPER = {"gen": [67.30, 67.09, 8.6508, 0.4407, 2.2810], "linear": [66.85, 67.78, 8.4438, 0.4375, 2.2561],
         "cosine": [66.59, 67.35, 8.4511, 0.4290, 2.2553], "constant": [65.95, 66.69, 8.3982, 0.4462, 2.1697],
         "invsqrt": [65.10, 66.19, 8.1274, 0.4047, 2.1001], "inv": [64.43, 65.95, 8.0447, 0.4010, 2.0792]}


def applies(runs: list[Run]) -> bool:
    return any(run.select("table3.row") for run in runs)


def collect(runs: list[Run]) -> dict[str, list[Run]]:
    return group_runs(runs, lambda run: run.select("table3.row"), list(ROWS))


def cell(members: list[Run], key: str) -> str:
    values = [r.final()[key] for r in members if r.status == "finished" and key in r.final()]
    return mean_spread(values, COLUMNS[key][1])


def render_markdown(rows: dict[str, list[Run]]) -> str:
    first = next(iter(rows.values()))[0]
    task, model = first.select("task.name", "?"), first.select("model.pretrained") or "GPT-2 from scratch"
    title = f"Table 3: {model} on {task}" + (" (SYNTHETIC data: not comparable to the paper)"
                                             if task.startswith("synthetic") else "")
    names = [label for label, _ in COLUMNS.values()]
    lines = [f"# {title}", "", "Test split, end of training; mean over seeds ± half the range.", "",
             "| row | seeds | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for row, members in rows.items():
        diverged = sum(r.status == "diverged" for r in members)
        seeds = f"{len({r.select('seed') for r in members})}" + (f" ({diverged} diverged)" if diverged else "")
        lines.append(f"| {ROWS.get(row, row)} | {seeds} | " + " | ".join(cell(members, k) for k in COLUMNS) + " |")
    lines += ["", "The paper (GPT-2 + LoRA, E2E test):", "", "| row | " + " | ".join(names[:-1]) + " |",
              "|" + "---|" * len(names)]
    lines += [f"| {ROWS[row]} | " + " | ".join(f"{v:g}" for v in values) + " |" for row, values in PAPER.items()]
    return "\n".join(lines) + "\n"


def render_figure(rows: dict[str, list[Run]], path: Path) -> Path:
    return lr_and_loss_figure(rows, ROWS, path, lr_title="lr (Figure 1, right)",
                              loss_label="training loss (per token)", solid=["gen"])


def render(runs: list[Run], out_dir: Path) -> list[Path]:
    rows = collect(runs)
    return write_report(out_dir, "table3", render_markdown(rows), lambda path: render_figure(rows, path))
