"""`genrun-report` on a sweep no paper table covers: one row per combination of what varied."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from genrun.report import main
from genrun.report.runs import load_runs
from genrun.report.sweep import split_of, varying


def _fake_run(root: Path, num: int, overrides: list[str], status: str, final: dict, lr: float = 0.1,
              wall: float = 2.0, commit: str = "0123456789ab") -> None:
    run = root / str(num)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"task": {"name": "digits"}})))
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "summary.json").write_text(json.dumps({"status": status, "final": final, "lr": [lr, lr],
                                                  "wall_time_s": wall, "versions": {"genrun_commit": commit}}))
    records = [{"kind": "train", "step": s, "lr": [lr], "loss": 2.0 / s} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _sweep(root: Path) -> Path:
    num = 0
    for optim in ("sgd", "gen_sgd"):
        for seed, acc in zip((0, 1, 2), (0.90, 0.94, 0.92)):
            diverged = optim == "sgd" and seed == 2
            final = {} if diverged else {"val": {"acc": acc - 0.1}, "test": {"acc": acc, "loss": 0.3}}
            _fake_run(root, num, [f"optim={optim}", f"seed={seed}", "trainer.max_steps=5", "trainer.progress=off"],
                      "diverged" if diverged else "finished", final, lr=0.05 if optim == "sgd" else 0.2)
            num += 1
    return root


def test_rows_are_what_varied_and_cells_average_finished_seeds(tmp_path, capsys):
    root = _sweep(tmp_path)
    runs = load_runs(root)
    assert [r.path.name for r in runs] == [str(i) for i in range(6)]
    assert varying(runs) == ["optim"] and split_of(runs) == "test"

    assert main([str(root)]) == 0
    md = (root / "sweep.md").read_text()
    assert "| row | seeds | acc | loss | final lr | wall time (s) |" in md
    assert "| optim=sgd | 2 (1 diverged) | 0.9200 ±0.0200 | 0.3000 ±0.0000 | 0.05 | 2.0 ±0.0 |" in md
    assert "| optim=gen_sgd | 3 | 0.9200 ±0.0200 | 0.3000 ±0.0000 | 0.2 | 2.0 ±0.0 |" in md
    assert (root / "sweep_curves.png").stat().st_size > 10_000
    out = capsys.readouterr()
    assert str(root / "sweep.md") in out.out and "commits" not in out.err  # one code version: nothing to say


def test_runs_of_different_code_are_pointed_out(tmp_path, capsys):
    for num, commit in enumerate(("aaaaaaaaaaaa", "bbbbbbbbbbbb-dirty", "aaaaaaaaaaaa")):
        _fake_run(tmp_path, num, [f"seed={num}"], "finished", {"test": {"acc": 0.9}}, commit=commit)
    assert main([str(tmp_path)]) == 0
    assert ("genrun-report: note: these runs come from 2 genrun commits (aaaaaaaaaaaa, bbbbbbbbbbbb-dirty)"
            in capsys.readouterr().err)


def test_a_sweep_over_seeds_only_is_one_row_and_job_ten_comes_after_job_two(tmp_path):
    for num in range(11):
        _fake_run(tmp_path, num, [f"seed={num}"], "finished", {"dev": {"acc": 0.5 + num / 100}})
    runs = load_runs(tmp_path)
    assert [r.path.name for r in runs] == [str(i) for i in range(11)]
    assert varying(runs) == [] and split_of(runs) == "dev"
    assert main([str(tmp_path)]) == 0
    assert "| all runs | 11 | 0.5500 ±0.0500 |" in (tmp_path / "sweep.md").read_text()
