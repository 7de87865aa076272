"""`genrun-report` on a `+experiment=gen_suite` sweep: tuned best, GeN's score per cell, the worst cell, collapses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from genrun.report import gen_suite, main
from genrun.report.runs import load_runs

CELLS = {
    "vision": {"metric": {"split": "test", "name": "acc", "goal": "max", "collapsed": 0.2}},
    "bowl": {"metric": {"split": "test", "name": "objective", "goal": "min", "collapsed": 10.0}},
}


def _run(root: Path, num: int, cell: str, row: str, seed: int, value: float | None, status: str = "finished",
         extra: tuple[str, ...] = ()) -> None:
    run = root / str(num)
    (run / ".hydra").mkdir(parents=True)
    cfg = {"seed": seed, "gen_suite": {"cell": cell, "row": row, **CELLS[cell]}}
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    overrides = ["+experiment=gen_suite", f"experiment/gen_suite_cell={cell}", f"experiment/gen_suite_row={row}",
                 f"seed={seed}", *extra]
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    name = CELLS[cell]["metric"]["name"]
    final = {"test": {name: value}} if value is not None else {}
    (run / "summary.json").write_text(json.dumps({"status": status, "final": final, "lr": [0.1]}))
    records = [{"kind": "train", "step": s, "lr": [0.1 * s], "loss": 1.0 / s} for s in range(1, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _suite(root: Path) -> Path:
    rows = {  # cell -> row -> the seeds' values
        "vision": {"const_1": [0.80, 0.82], "const_2": [0.90, 0.92], "sched_2": [0.93, 0.95], "const_4": [0.5, 0.5],
                   "gen": [0.94, 0.92], "gen_div10": [0.85, 0.87], "gen_x10": [0.10, 0.94], "prodigy": [0.90, 0.90]},
        "bowl": {"const_1": [1e-2, 1e-2], "sched_1": [1e-4, 4e-4], "gen": [1e-4, 1e-4], "gen_div10": [4e-4, 4e-4],
                 "gen_x10": [2e-4, 2e-4]},
    }
    num = 0
    for cell, by_row in rows.items():
        for row, values in by_row.items():
            for seed, value in enumerate(values):
                _run(root, num, cell, row, seed, value)
                num += 1
    _run(root, num, "vision", "gen", 2, None, status="diverged")  # a third seed that diverged
    return root


def test_scores_are_each_row_over_the_best_tuned_baseline(tmp_path):
    scores = gen_suite.scores(load_runs(_suite(tmp_path)))
    best = 0.94  # vision: sched_2's mean beats every constant lr
    mean, score, collapsed = scores["vision"]["gen"]
    assert collapsed == 1  # the diverged seed, counted at the collapse limit
    assert mean == pytest.approx((0.94 + 0.92 + 0.2) / 3)
    assert score == pytest.approx(mean / best)
    assert scores["vision"]["gen_x10"][2] == 1  # 0.10 is at or below chance + the limit
    assert scores["vision"]["prodigy"][1] == pytest.approx(0.90 / best)
    # an objective: tuned ÷ row, geometric means over seeds (sched_1: sqrt(1e-4·4e-4) = 2e-4)
    assert scores["bowl"]["gen"][1] == pytest.approx(2e-4 / 1e-4)
    assert scores["bowl"]["gen_div10"][1] == pytest.approx(0.5)


def test_report_names_the_worst_cell_per_start_and_counts_collapses(tmp_path, capsys):
    root = _suite(tmp_path)
    assert main([str(root)]) == 0
    md = (root / "gen_suite.md").read_text()
    assert "| cell | metric | tuned best | GeN from η0 | GeN from η0/10 | GeN from 10·η0 | prodigy |" in md
    assert "0.940 ±0.010 (sched_2)" in md
    assert "- GeN from η0: 0.730 on vision (target 0.98: missed by 0.250)" in md
    assert "- GeN from η0/10: 0.500 on bowl (target 0.95: missed by 0.450)" in md
    assert "(sched_1, at the grid's edge)" in md  # bowl's best baseline is its grid's first point
    assert "Collapsed GeN runs (diverged, or at chance / popularity / the starting objective): 2." in md
    assert "grid's edge" not in md.split("\n| vision")[1].split("\n")[0]  # sched_2 is inside the grid
    assert (root / "gen_suite_lr.png").stat().st_size > 10_000
    assert str(root / "gen_suite.md") in capsys.readouterr().out


def test_gen_rows_of_another_setting_get_their_own_column(tmp_path):
    root = _suite(tmp_path)
    _run(root, 100, "vision", "gen", 0, 0.96, extra=("optim.gen.cap=2.0",))
    cells = gen_suite.collect(load_runs(root))
    assert "gen [optim.gen.cap=2.0]" in cells["vision"] and len(cells["vision"]["gen"].runs) == 3
    assert "GeN from η0 [optim.gen.cap=2.0]" in gen_suite.render_markdown(cells)
